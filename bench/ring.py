"""The SPSC shared-memory ring beside multiprocessing.Pipe, two processes, 1 KiB records.

    python bench/ring.py [--quick] [--spin-us 50]

Both peers have the same process structure: the measuring parent and one child
started by multiprocessing ("spawn"), so the ring and the pipe pay the same process
setup and scheduling.  Prints progress to stderr and, as its last line, one JSON object
``{"bench": "ring", "ratios": {...}, "results": {...}, "machine": {...}}``; every ratio
is oriented so that above 1 means the ring is better.

* ``ring_oneway_1k_vs_pipe``: records/s, the child sends N records of 1 KiB, the parent
  receives them (ring: Producer.push / Consumer.pop into bytes; pipe:
  Connection.send_bytes / recv_bytes), timed from the first record received to the last.
* ``ring_pingpong_1k_vs_pipe``: round-trip p50, the parent sends 1 KiB and waits for the
  child's 1 KiB echo (ring: one ring each way; pipe: a duplex Pipe), pipe p50 / ring p50.

Rounds alternate ring and pipe; each figure is the median of its rounds.  The ring's
spin-before-sleep (``--spin-us``) is what keeps a round trip off the futex path; the
results include both sides' futex sleep counts so a reader can see which path ran.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import machine, progress
from fabric_ext import ring as fring

KIB = 1024
RING_CAPACITY = 1 << 20

log = progress("ring")


def _ring_path(tag: str) -> str:
    return f"/dev/shm/fabric-ring-bench-{os.getpid()}-{tag}-{secrets.token_hex(4)}"


# -- children (module level so "spawn" can import them) -----------------------------------


def _ring_sender(path: str, n: int, spin_us: float) -> None:
    p = fring.Producer(path, spin_us=spin_us)
    rec = b"x" * KIB
    for _ in range(n):
        p.push(rec)
    p.close()


def _pipe_sender(conn: Connection, n: int) -> None:
    rec = b"x" * KIB
    for _ in range(n):
        conn.send_bytes(rec)
    conn.close()


def _ring_echo(inbox: str, outbox: str, spin_us: float) -> None:
    c = fring.Consumer(inbox, spin_us=spin_us)
    p = fring.Producer(outbox, spin_us=spin_us)
    try:
        while True:
            p.push(c.pop())
    except fring.RingClosed:
        pass
    p.close()
    c.close()


def _pipe_echo(conn: Connection) -> None:
    try:
        while True:
            conn.send_bytes(conn.recv_bytes())
    except EOFError:
        pass


# -- measurements --------------------------------------------------------------------


def ring_oneway(ctx: Any, n: int, spin_us: float) -> tuple[float, dict[str, Any]]:
    path = _ring_path("oneway")
    fring.create(path, RING_CAPACITY)
    try:
        c = fring.Consumer(path, spin_us=spin_us)
        child = ctx.Process(target=_ring_sender, args=(path, n, spin_us))
        child.start()
        c.pop(timeout=60)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            c.pop()  # like recv_bytes(): no timeout
        elapsed = time.perf_counter() - t0
        child.join(60)
        st = c.stats()
        c.close()
    finally:
        fring.unlink(path)
    return (n - 1) / elapsed, st


def pipe_oneway(ctx: Any, n: int) -> float:
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_pipe_sender, args=(send, n))
    child.start()
    send.close()
    recv.recv_bytes()
    t0 = time.perf_counter()
    for _ in range(n - 1):
        recv.recv_bytes()
    elapsed = time.perf_counter() - t0
    child.join(60)
    return (n - 1) / elapsed


def ring_pingpong(ctx: Any, n: int, warm: int, spin_us: float) -> tuple[list[float], dict[str, Any]]:
    to_child, to_parent = _ring_path("ping"), _ring_path("pong")
    fring.create(to_child, RING_CAPACITY)
    fring.create(to_parent, RING_CAPACITY)
    try:
        p = fring.Producer(to_child, spin_us=spin_us)
        c = fring.Consumer(to_parent, spin_us=spin_us)
        child = ctx.Process(target=_ring_echo, args=(to_child, to_parent, spin_us))
        child.start()
        rec = b"p" * KIB
        samples = []
        for i in range(warm + n):
            t0 = time.perf_counter()
            p.push(rec)
            c.pop(timeout=60)
            if i >= warm:
                samples.append(time.perf_counter() - t0)
        p.shutdown()
        child.join(60)
        st = {"to_child": p.stats(), "to_parent": c.stats()}
        p.close()
        c.close()
    finally:
        fring.unlink(to_child)
        fring.unlink(to_parent)
    return samples, st


def pipe_pingpong(ctx: Any, n: int, warm: int) -> list[float]:
    mine, theirs = ctx.Pipe(duplex=True)
    child = ctx.Process(target=_pipe_echo, args=(theirs,))
    child.start()
    theirs.close()
    rec = b"p" * KIB
    samples = []
    for i in range(warm + n):
        t0 = time.perf_counter()
        mine.send_bytes(rec)
        mine.recv_bytes()
        if i >= warm:
            samples.append(time.perf_counter() - t0)
    mine.close()
    child.join(60)
    return samples


def main() -> None:
    # bench/_common.parse_args knows only --quick; this bench adds --spin-us.
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer records and rounds")
    ap.add_argument("--spin-us", type=float, default=fring.DEFAULT_SPIN_US,
                    help=f"ring spin before sleeping (default {fring.DEFAULT_SPIN_US})")
    args = ap.parse_args()
    spin = args.spin_us
    rounds = 3 if args.quick else 5
    n_oneway = 50_000 if args.quick else 200_000
    n_ping, warm = (3_000, 300) if args.quick else (20_000, 1_000)
    ctx = mp.get_context("spawn")

    ring_rates, pipe_rates, ring_p50s, pipe_p50s = [], [], [], []
    ring_p99s, pipe_p99s = [], []
    oneway_stats: dict[str, Any] = {}
    ping_stats: dict[str, Any] = {}
    for r in range(rounds):
        rate, oneway_stats = ring_oneway(ctx, n_oneway, spin)
        ring_rates.append(rate)
        pipe_rates.append(pipe_oneway(ctx, n_oneway))
        log(f"round {r + 1}/{rounds} one-way 1 KiB: ring {ring_rates[-1]:,.0f}/s, pipe {pipe_rates[-1]:,.0f}/s")
        s, ping_stats = ring_pingpong(ctx, n_ping, warm, spin)
        q = statistics.quantiles(s, n=100)
        ring_p50s.append(statistics.median(s) * 1e6)
        ring_p99s.append(q[98] * 1e6)
        s = pipe_pingpong(ctx, n_ping, warm)
        q = statistics.quantiles(s, n=100)
        pipe_p50s.append(statistics.median(s) * 1e6)
        pipe_p99s.append(q[98] * 1e6)
        log(f"round {r + 1}/{rounds} ping-pong 1 KiB p50: ring {ring_p50s[-1]:.1f} us, pipe {pipe_p50s[-1]:.1f} us")

    med = statistics.median
    results: dict[str, Any] = {
        "ring_oneway_1k_msgs_per_s": med(ring_rates),
        "pipe_oneway_1k_msgs_per_s": med(pipe_rates),
        "ring_pingpong_1k_p50_us": med(ring_p50s),
        "pipe_pingpong_1k_p50_us": med(pipe_p50s),
        "ring_pingpong_1k_p99_us": med(ring_p99s),
        "pipe_pingpong_1k_p99_us": med(pipe_p99s),
        "oneway_rounds_ring": [round(x) for x in ring_rates],
        "oneway_rounds_pipe": [round(x) for x in pipe_rates],
        "pingpong_rounds_ring_p50_us": [round(x, 2) for x in ring_p50s],
        "pingpong_rounds_pipe_p50_us": [round(x, 2) for x in pipe_p50s],
        "ring_oneway_futex_sleeps": {"producer": oneway_stats["producer_waits"],
                                     "consumer": oneway_stats["consumer_waits"]},
        "ring_pingpong_futex_sleeps": {"parent": ping_stats["to_parent"]["consumer_waits"],
                                       "child": ping_stats["to_child"]["consumer_waits"]},
        "records_oneway": n_oneway,
        "round_trips": n_ping,
        "rounds": rounds,
    }
    ratios = {
        "ring_oneway_1k_vs_pipe": results["ring_oneway_1k_msgs_per_s"] / results["pipe_oneway_1k_msgs_per_s"],
        "ring_pingpong_1k_vs_pipe": results["pipe_pingpong_1k_p50_us"] / results["ring_pingpong_1k_p50_us"],
    }
    targets = {"ring_oneway_1k_vs_pipe": 10, "ring_pingpong_1k_vs_pipe": 4}
    for name, target in targets.items():
        log(f"{name}: {ratios[name]:.2f} (target >= {target})")
    print(json.dumps({"bench": "ring", "ratios": {k: round(v, 3) for k, v in ratios.items()},
                      "targets": targets,
                      "results": {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()},
                      "machine": machine(spin_us=spin, ring_capacity=RING_CAPACITY)}))


if __name__ == "__main__":
    main()
