"""Worker hot loop: an empty job through a warm ring worker vs a multiprocessing.Pipe ping-pong.

What a pool pays per job once the worker is warm: the controller pushes a v1 job
frame on ring-in, ``python -m fabric.services.spawner.worker`` pops it, calls the core
(tests/cores/echo.c, empty data: the loop's own cost), pushes the result, the
controller pops it.  The peer, in the same run, is the cheapest cross-process
exchange Python offers: a child answering each ``Connection.send_bytes`` on a
``multiprocessing.Pipe`` with an empty message (it does no parsing and calls no
core, so the ratios are conservative).

Measured: sequential round-trip p50/p99, pipelined jobs/s (64 in flight), and
the worker process's CPU time per job (/proc/PID/schedstat, in ns, over
the pipelined run).  Prints one JSON line last.

    .venv/bin/python bench/worker.py [--quick]
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import machine, parse_args, progress
from fabric_ext import ring, wire
from tests._cores import TEST_CORES, build_core

RING_CAPACITY = 1 << 20
IN_FLIGHT = 64
log = progress("worker")


def _cpu_s(pid: int) -> float:
    """CPU time of *pid*'s main thread in seconds (schedstat: nanoseconds, not clock ticks)."""
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0]) / 1e9


def _pipe_child(conn: Connection) -> None:
    recv, send = conn.recv_bytes, conn.send_bytes
    try:
        while True:
            recv()
            send(b"")
    except EOFError:
        pass


def ring_worker(n_seq: int, n_pipe: int, rounds: int) -> dict[str, Any]:
    core = build_core(TEST_CORES / "echo.c", Path(tempfile.gettempdir()) / "fabric-bench-cores")
    base = f"/dev/shm/fabric-ring-bench-worker-{uuid.uuid4().hex[:12]}"
    paths = [f"{base}-in", f"{base}-out"]
    for p in paths:
        ring.create(p, RING_CAPACITY)
    prod, cons = ring.Producer(paths[0]), ring.Consumer(paths[1])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "fabric.services.spawner.worker", "--ring-in", paths[0],
                             "--ring-out", paths[1]], env=env)
    try:
        prod.push(wire.v1_version(1))
        assert wire.v1_parse_version_reply(wire.v1_parse(cons.pop(timeout=10)).payload)
        prod.push(wire.v1_core(2, "echo", core.read_bytes()))
        assert wire.v1_parse(cons.pop(timeout=10)).kind == wire.V1_OK
        job = wire.v1_job(3, 4, b"")
        for _ in range(1000):                         # warm up
            prod.push(job)
            cons.pop(timeout=10)
        p50s, p99s, rates, cpus = [], [], [], []
        for r in range(rounds):
            samples = []
            for _ in range(n_seq):
                t = time.perf_counter()
                prod.push(job)
                cons.pop(timeout=10)
                samples.append(time.perf_counter() - t)
            p50s.append(statistics.median(samples) * 1e6)
            p99s.append(statistics.quantiles(samples, n=100)[98] * 1e6)
            c0, t0, inflight = _cpu_s(proc.pid), time.perf_counter(), 0
            for _ in range(n_pipe):
                prod.push(job)
                inflight += 1
                if inflight >= IN_FLIGHT:
                    cons.pop(timeout=10)
                    inflight -= 1
            while inflight:
                cons.pop(timeout=10)
                inflight -= 1
            dt = time.perf_counter() - t0
            rates.append(n_pipe / dt)
            cpus.append((_cpu_s(proc.pid) - c0) / n_pipe * 1e6)
            log(f"round {r + 1}/{rounds} ring worker: p50 {p50s[-1]:.1f} us, {rates[-1]:.0f} jobs/s, "
                f"worker CPU {cpus[-1]:.2f} us/job")
    finally:
        prod.shutdown()
        proc.wait(10)
        prod.close()
        cons.close()
        for p in paths:
            ring.unlink(p)
    med = statistics.median
    return {"ring_job_p50_us": med(p50s), "ring_job_p99_us": med(p99s), "ring_jobs_per_s": med(rates),
            "worker_cpu_us_per_job": med(cpus), "rounds_ring_p50_us": [round(x, 2) for x in p50s],
            "rounds_ring_jobs_per_s": [round(x) for x in rates]}


def pipe_peer(n_seq: int, n_pipe: int, rounds: int) -> dict[str, Any]:
    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(target=_pipe_child, args=(child,), daemon=True)
    proc.start()
    child.close()
    msg = wire.v1_job(3, 4, b"")                      # the same 33 bytes go out
    try:
        for _ in range(1000):
            parent.send_bytes(msg)
            parent.recv_bytes()
        p50s, rates = [], []
        for r in range(rounds):
            samples = []
            for _ in range(n_seq):
                t = time.perf_counter()
                parent.send_bytes(msg)
                parent.recv_bytes()
                samples.append(time.perf_counter() - t)
            p50s.append(statistics.median(samples) * 1e6)
            t0, inflight = time.perf_counter(), 0
            for _ in range(n_pipe):
                parent.send_bytes(msg)
                inflight += 1
                if inflight >= IN_FLIGHT:
                    parent.recv_bytes()
                    inflight -= 1
            while inflight:
                parent.recv_bytes()
                inflight -= 1
            rates.append(n_pipe / (time.perf_counter() - t0))
            log(f"round {r + 1}/{rounds} pipe peer: p50 {p50s[-1]:.1f} us, {rates[-1]:.0f} msgs/s")
    finally:
        parent.close()
        proc.join(10)
    med = statistics.median
    return {"pipe_p50_us": med(p50s), "pipe_msgs_per_s": med(rates),
            "rounds_pipe_p50_us": [round(x, 2) for x in p50s]}


def main() -> None:
    args = parse_args(__doc__, "fewer jobs per round (CI smoke run)")
    n_seq, n_pipe, rounds = (2000, 5000, 3) if args.quick else (20000, 50000, 5)
    results = {**ring_worker(n_seq, n_pipe, rounds), **pipe_peer(n_seq, n_pipe, rounds)}
    ratios = {
        "empty_job_rtt_vs_pipe_pingpong": results["pipe_p50_us"] / results["ring_job_p50_us"],
        "jobs_per_s_vs_pipe_msgs_per_s": results["ring_jobs_per_s"] / results["pipe_msgs_per_s"],
    }
    for k, v in ratios.items():
        log(f"{k}: {v:.2f}")
    print(json.dumps({"bench": "worker",
                      "ratios": {k: round(v, 3) for k, v in ratios.items()},
                      "results": {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()},
                      "machine": machine(ring_capacity=RING_CAPACITY, in_flight=IN_FLIGHT,
                                         sequential_jobs=n_seq, pipelined_jobs=n_pipe, rounds=rounds)}))


if __name__ == "__main__":
    main()
