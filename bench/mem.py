"""Remote memory: fabric beside Redis (redis-py) and a bare nats-py responder, in one run.

    python bench/mem.py [--quick]

Starts everything it measures on free loopback ports: ``fabric up`` (embedded
nats-server + allocator, timed to ready), ``redis-server`` (Debian package; see
scripts/install-bench-deps.sh), and a bare nats-py responder in its own process on
the same NATS server.  Prints progress to stderr and, as its last line, one JSON
object ``{"bench": "mem", "ratios": {...}, "results": {...}, "machine": {...}}``.
Every ratio is oriented so that above 1 means fabric is better.

Like for like:
* ``overhead_vs_nats_echo``: remote 1 KiB read (AsyncFabricClient, frames) vs a
  bare nats-py request whose responder answers with 1 KiB, both sequential, both
  on uvloop, both through the same nats-server, both responders in their own process.
* ``batch_read_1k_vs_redis_pipeline``: 100 reads of 1 KiB in one ``rreadv`` vs a
  redis-py pipeline of 100 GETs (items per second), measured in alternating windows
  (medians; ``batch_window_ratios`` shows each window's ratio).
* ``local_read_1k_vs_redis``: the sync client's local fast path vs redis-py GET (p50).
* ``rw_1m_vs_redis``: 1 MiB write+read through the bus (local path off) vs SET+GET;
  ``rw_1m_local_vs_redis`` the same with the default client on the allocator's host
  (local fast path), for information.
* ``alloc_free_vs_bytearray``: Arena.alloc+free of 1 KiB vs ``bytearray(1024)``.
* ``write_1m_vs_nats_send`` (information): a 1 MiB remote write (AsyncFabricClient) vs a
  bare nats-py request carrying the same megabyte to the responder: what fabric adds
  to the bus for bulk bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import NATS_RESPONDER, connect_options, machine, parse_args, progress, use_fabric_credentials
from bench._common import atimed as atimed_loop

KIB = 1024
MIB = 1024 * 1024


log = progress("mem")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def timed_loop(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# -- peers ---------------------------------------------------------------------


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("redis-server")
    if not exe:
        sys.exit("redis-server not found: run scripts/install-bench-deps.sh (Debian package redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--proto-max-bulk-len", "64mb"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    r = redis.Redis(port=port)
    for _ in range(200):
        try:
            r.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    sys.exit("redis-server did not start")


def fabric_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fabric.cli", *args]


def fabric_up(state: Path) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    out = subprocess.run(fabric_cmd("up", "-d", "--nats-port", "0", "--state-dir", str(state)),
                         capture_output=True, text=True, env=env, timeout=120)
    ready_s = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"fabric up failed:\n{out.stdout}\n{out.stderr}")
    st = json.loads((state / "state.json").read_text())
    use_fabric_credentials(st)
    return st["nats_url"], ready_s, st["node"]


def fabric_down(state: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(fabric_cmd("down", "--purge", "--state-dir", str(state)), capture_output=True, env=env, timeout=60)


# -- measurements ------------------------------------------------------------------


async def async_part(url: str, redis_port: int, n: int, quick: bool) -> dict[str, Any]:
    import nats

    from fabric import AsyncFabricClient

    res: dict[str, Any] = {}
    echo = subprocess.Popen([sys.executable, "-c", NATS_RESPONDER, url], stdout=subprocess.PIPE)
    echo_subject = f"bench.bus.{KIB}"  # answered with 1 KiB
    assert echo.stdout is not None
    echo.stdout.readline()
    try:
        nc = await nats.connect(url, **connect_options())
        req = b"r" * 160  # about the size of a one-item READ frame
        for _ in range(200):
            await nc.request(echo_subject, req, timeout=5)
        echo_rtt = p50(await atimed_loop(lambda: nc.request(echo_subject, req, timeout=5), n))
        big = os.urandom(MIB)
        res["nats_send_1m_rtt_p50_us"] = p50(await atimed_loop(
            lambda: nc.request(echo_subject, big, timeout=10), max(30, n // 10))) * 1e6
        await nc.close()
    finally:
        echo.terminate()
        echo.wait()
    res["nats_echo_1k_rtt_p50_us"] = echo_rtt * 1e6

    async with AsyncFabricClient(url, local=False) as fc:
        buf = await fc.rmalloc(KIB)
        await fc.rwrite(buf, b"y" * KIB)
        for _ in range(200):
            await fc.rread(buf, KIB)
        read_rtt = p50(await atimed_loop(lambda: fc.rread(buf, KIB), n))
        res["fabric_read_1k_rtt_p50_us"] = read_rtt * 1e6
        write_rtt = p50(await atimed_loop(lambda: fc.rwrite(buf, b"z" * KIB), n))
        res["fabric_write_1k_rtt_p50_us"] = write_rtt * 1e6
        big_buf = await fc.rmalloc(MIB)
        big = os.urandom(MIB)
        res["fabric_write_1m_rtt_p50_us"] = p50(await atimed_loop(
            lambda: fc.rwrite(big_buf, big), max(30, n // 10))) * 1e6
        await fc.rfree(big_buf)

        bufs = [await fc.rmalloc(KIB) for _ in range(100)]
        items = [(b, 0, KIB) for b in bufs]
        await fc.rreadv(items)

        # Batches against the Redis pipeline in alternating windows, so both see the
        # same moments of this shared machine; the medians of the windows are reported.
        import redis

        r = redis.Redis(port=redis_port)
        keys = [f"k{i}" for i in range(100)]
        for k in keys:
            r.set(k, os.urandom(KIB))
        rounds, windows = (50, 3) if quick else (200, 9)
        fabric_rates, redis_rates = [], []
        for _ in range(windows):
            t0 = time.perf_counter()
            for _ in range(rounds):
                await fc.rreadv(items)
            fabric_rates.append(rounds * 100 / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(rounds):
                p = r.pipeline(transaction=False)
                for k in keys:
                    p.get(k)
                p.execute()
            redis_rates.append(rounds * 100 / (time.perf_counter() - t0))
        res["fabric_batch_read_1k_items_per_s"] = statistics.median(fabric_rates)
        res["redis_pipeline_get_1k_items_per_s"] = statistics.median(redis_rates)
        res["batch_window_ratios"] = [round(f / g, 3) for f, g in zip(fabric_rates, redis_rates, strict=True)]
        for b in bufs + [buf]:
            await fc.rfree(b)
    return res


def sync_part(url: str, redis_port: int, n: int, quick: bool) -> dict[str, Any]:
    import redis

    from fabric import FabricClient

    res: dict[str, Any] = {}
    r = redis.Redis(port=redis_port)
    for size, label in ((KIB, "1k"), (64 * KIB, "64k"), (MIB, "1m")):
        val = os.urandom(size)
        reps = n if size < MIB else max(20, n // 20)
        r.set("k", val)
        res[f"redis_set_{label}_p50_us"] = p50(timed_loop(partial(r.set, "k", val), reps)) * 1e6
        res[f"redis_get_{label}_p50_us"] = p50(timed_loop(lambda: r.get("k"), reps)) * 1e6

    with FabricClient(url, local=False) as fc:
        for size, label in ((KIB, "1k"), (64 * KIB, "64k"), (MIB, "1m")):
            val = os.urandom(size)
            reps = n if size < MIB else max(20, n // 20)
            buf = fc.rmalloc(size)
            fc.rwrite(buf, val)
            res[f"fabric_write_{label}_p50_us"] = p50(timed_loop(partial(fc.rwrite, buf, val), reps)) * 1e6
            res[f"fabric_read_{label}_p50_us"] = p50(timed_loop(partial(fc.rread, buf, size), reps)) * 1e6
            assert fc.rread(buf, size) == val
            fc.rfree(buf)

    with FabricClient(url, local=True) as fc:
        buf = fc.rmalloc(KIB)
        fc.rwrite(buf, b"q" * KIB)
        assert fc._aio._local.view(__import__("fabric.handles").handles.parse(buf.handle)) is not None, \
            "local fast path not active"
        number = 20000 if quick else 200000
        t = timeit.repeat(lambda: fc.rread(buf, KIB), number=number, repeat=5)
        res["fabric_local_read_1k_us"] = min(t) / number * 1e6
        t = timeit.repeat(lambda: fc.rwrite(buf, b"w" * KIB), number=number, repeat=5)
        res["fabric_local_write_1k_us"] = min(t) / number * 1e6
        fc.rfree(buf)
        big = fc.rmalloc(MIB)
        val = os.urandom(MIB)
        fc.rwrite(big, val)
        reps = max(20, n // 20)
        res["fabric_local_write_1m_p50_us"] = p50(timed_loop(lambda: fc.rwrite(big, val), reps)) * 1e6
        res["fabric_local_read_1m_p50_us"] = p50(timed_loop(lambda: fc.rread(big, MIB), reps)) * 1e6
        fc.rfree(big)
    return res


def alloc_part(quick: bool) -> dict[str, Any]:
    from fabric_ext.arena import Arena

    number = 100000 if quick else 1000000
    prefix = f"fabric-bench-{os.getpid()}"
    arena = Arena(prefix, 256 * MIB)
    try:
        alloc, free = arena.alloc, arena.free

        def arena_cycle() -> None:
            s, o, g = alloc(KIB)
            free(s, o, g)

        arena_t = min(timeit.repeat(arena_cycle, number=number, repeat=5)) / number
        ba_t = min(timeit.repeat(lambda: bytearray(KIB), number=number, repeat=5)) / number
    finally:
        arena.destroy()
    return {"arena_alloc_free_1k_ns": arena_t * 1e9, "bytearray_1k_ns": ba_t * 1e9}


def peers() -> dict[str, Any]:
    """The versions of the peers this bench runs beside fabric."""
    import msgspec

    try:
        import redis

        redis_py = redis.__version__
    except ImportError:
        redis_py = None
    redis_server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    return {"msgspec": msgspec.__version__, "redis_py": redis_py, "redis_server": redis_server.split(" sha=")[0]}


def main() -> None:
    args = parse_args(__doc__, "fewer samples: finishes in under a minute")
    n = 300 if args.quick else 3000

    with tempfile.TemporaryDirectory(prefix="fabric-bench-") as tmp:
        tmpdir = Path(tmp)
        log("starting fabric up (embedded nats-server + allocator)")
        state = tmpdir / "state"
        url, ready_s, node = fabric_up(state)
        log(f"fabric ready in {ready_s:.2f}s at {url}")
        redis_proc, redis_port = start_redis(tmpdir)
        log(f"redis-server on port {redis_port}")
        try:
            import uvloop

            log("sequential RTT vs a bare nats-py responder; batches vs Redis pipelines (alternating windows)")
            results: dict[str, Any] = {"fabric_up_ready_s": ready_s}
            results.update(uvloop.run(async_part(url, redis_port, n, args.quick)))
            log("fabric vs redis-py: 1 KiB / 64 KiB / 1 MiB, pipelines, local fast path")
            results.update(sync_part(url, redis_port, n, args.quick))
            log("arena alloc+free vs bytearray")
            results.update(alloc_part(args.quick))
        finally:
            redis_proc.send_signal(signal.SIGTERM)
            redis_proc.wait()
            fabric_down(state)

    rw_fabric = results["fabric_write_1m_p50_us"] + results["fabric_read_1m_p50_us"]
    rw_redis = results["redis_set_1m_p50_us"] + results["redis_get_1m_p50_us"]
    results["fabric_rw_1m_gb_per_s"] = 2 * MIB / (rw_fabric / 1e6) / 1e9
    results["redis_rw_1m_gb_per_s"] = 2 * MIB / (rw_redis / 1e6) / 1e9
    ratios = {
        "overhead_vs_nats_echo": results["nats_echo_1k_rtt_p50_us"] / results["fabric_read_1k_rtt_p50_us"],
        "batch_read_1k_vs_redis_pipeline": results["fabric_batch_read_1k_items_per_s"]
        / results["redis_pipeline_get_1k_items_per_s"],
        "local_read_1k_vs_redis": results["redis_get_1k_p50_us"] / results["fabric_local_read_1k_us"],
        "rw_1m_vs_redis": rw_redis / rw_fabric,
        "rw_1m_local_vs_redis": rw_redis / (results["fabric_local_write_1m_p50_us"]
                                            + results["fabric_local_read_1m_p50_us"]),
        "alloc_free_vs_bytearray": results["bytearray_1k_ns"] / results["arena_alloc_free_1k_ns"],
        "write_1m_vs_nats_send": results["nats_send_1m_rtt_p50_us"] / results["fabric_write_1m_rtt_p50_us"],
        "read_1k_vs_redis_get": results["redis_get_1k_p50_us"] / results["fabric_read_1k_p50_us"],
        "write_1k_vs_redis_set": results["redis_set_1k_p50_us"] / results["fabric_write_1k_p50_us"],
    }
    targets = {"overhead_vs_nats_echo": 0.8, "batch_read_1k_vs_redis_pipeline": 2, "local_read_1k_vs_redis": 50,
               "rw_1m_vs_redis": 1, "alloc_free_vs_bytearray": 0.5}
    for name, target in targets.items():
        log(f"{name}: {ratios[name]:.2f} (target >= {target})")
    log(f"fabric up to ready: {ready_s:.2f}s (target < 1.5 s)")
    print(json.dumps({"bench": "mem", "ratios": {k: round(v, 3) for k, v in ratios.items()},
                      "targets": targets,
                      "results": {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()},
                      "machine": machine(**peers())}))


if __name__ == "__main__":
    main()
