"""Remote processes (and, from the pool side, warm compute jobs) against their local peers.

    python bench/spawn.py [--quick] [--only NAME ...]

Runs, in one go on free loopback ports: a nats-server (``tests/_nats.py``, the
same binary and max payload as ``fabric up``), the spawner as its own process
(``python -m fabric.services.spawner``, uvloop, exactly as ``fabric up`` runs it), the
bare nats-py responder of ``bench/_common.py`` (its own process), and the client
in this process (uvloop).

Scenarios (each one function in :data:`SCENARIOS`, returning figures and ratios):

* ``spawn_vs_local_plus_echo``: ``rrun(["/bin/true"])`` p50 -- spawn to exit known
  at the client, one round trip (the spawn waits for the exit) -- against local
  ``subprocess.run(["/bin/true"])`` p50 plus the bare nats-py echo RTT p50.  The
  three are sampled in alternating windows so drift on a shared machine hits them
  alike.  ratio = (local + echo) / remote; >= 1 means fabric adds nothing beyond
  a bare request and a local spawn.  Beside it, in the same windows, the floor of
  any spawner behind nats-py: a bare nats-py responder (its own process, uvloop)
  that starts ``/bin/true`` with :func:`fabric_ext.spawn.spawn`, no pipes, and
  answers when its pidfd says it ended (``bare_nats_spawn_floor_p50_us``).
* ``spawn_paths``: why the spawner spawns the way it does: every local way of
  starting ``/bin/true`` (``fabric_ext.spawn``, posix_spawn, subprocess with and
  without ``preexec_fn``, asyncio's subprocess on the default loop and on uvloop)
  and the spawner without and with an rlimit remotely.  Figures only, no ratio.

A scenario is ``async def name(ctx: Context, log) -> dict`` with ``results`` and
``ratios``; add one to :data:`SCENARIOS` and it runs (``--only`` picks some).  The
last line is one JSON object ``{"bench": "spawn", "results", "ratios", "targets", "machine"}``
(times are p50 in µs; ``targets``: the issue's minimum for each ratio, above 1 = fabric better).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import NATS_RESPONDER, machine, progress, stop_process
from tests._spawner import wait_ready

log = progress("spawn")


@dataclass
class Context:
    """What every scenario gets: the NATS URL, the spawner's node, a connected client, sizes."""

    url: str
    node: str
    state_dir: Path
    client: Any  # fabric.AsyncFabricClient, connected
    nc: Any  # a bare nats-py connection, for the echo peer
    quick: bool

    async def echo(self, size: int = 16) -> None:
        """One bare nats-py request/reply to the responder (the peer of every NATS figure)."""
        await self.nc.request(f"bench.bus.{size}", b"q" * 16, timeout=10)


def p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def timed(fn: Callable[[], Awaitable[Any]] | Callable[[], Any], n: int, *, is_async: bool = True) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        if is_async:
            await fn()  # type: ignore[misc]  # fn is async exactly when is_async
        else:
            fn()
        out.append(time.perf_counter() - t0)
    return out


#: the floor of a spawner behind nats-py: spawn /bin/true on request, answer at its exit
SPAWN_FLOOR_RESPONDER = r"""
import asyncio, os, sys, uvloop, nats
from fabric_ext.spawn import spawn
ENV = [f"{k}={v}".encode() for k, v in os.environ.items()]
async def main():
    nc = await nats.connect(sys.argv[1])
    loop = asyncio.get_running_loop()
    async def cb(msg):
        pid, pidfd = spawn("/bin/true", ["/bin/true"], ENV)
        def done():
            loop.remove_reader(pidfd)
            status = os.wait4(pid, 0)[1]
            os.close(pidfd)
            loop.create_task(msg.respond(b"%d" % status))
        loop.add_reader(pidfd, done)
    await nc.subscribe("bench.spawnfloor", cb=cb)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


async def spawn_vs_local_plus_echo(ctx: Context, log: Callable[[str], None]) -> dict[str, Any]:
    fc = ctx.client
    windows, per_window = (6, 30) if ctx.quick else (20, 50)
    floor_proc = subprocess.Popen([sys.executable, "-c", SPAWN_FLOOR_RESPONDER, ctx.url], cwd=REPO,
                                  stdout=subprocess.PIPE)
    assert floor_proc.stdout is not None
    floor_proc.stdout.readline()

    async def floor() -> None:
        reply = await ctx.nc.request("bench.spawnfloor", b"", timeout=10)
        if reply.data != b"0":
            raise RuntimeError(f"the floor responder's /bin/true ended with status {reply.data!r}")

    async def remote() -> None:
        ex = await fc.rrun(["/bin/true"], node=ctx.node, timeout=10)
        if ex.exit_code != 0:
            raise RuntimeError(f"/bin/true exited {ex.exit_code}")

    def local() -> None:
        subprocess.run(["/bin/true"], check=True)

    for _ in range(20):  # warm up every path once
        await remote()
        await ctx.echo()
        await floor()
        local()
    async def noop() -> None:  # the spawner's own request floor: a no-op answered inline
        await ctx.nc.request(f"fabric.proc.{ctx.node}.info", b"", timeout=10)

    idle: list[float] = []

    async def echo_after_idle() -> None:
        # the remote spawn leaves nats-server and the responder idle for about a spawn's
        # time; this echo shows what such a pause alone costs a round trip
        time.sleep(0.0007)
        t0 = time.perf_counter()
        await ctx.echo()
        idle.append(time.perf_counter() - t0)

    rem: list[float] = []
    loc: list[float] = []
    ech: list[float] = []
    nop: list[float] = []
    flo: list[float] = []
    try:
        for _ in range(windows):
            rem += await timed(remote, per_window)
            loc += await timed(local, per_window, is_async=False)
            ech += await timed(ctx.echo, per_window)
            flo += await timed(floor, per_window // 2)
            nop += await timed(noop, per_window // 2)
            for _ in range(per_window // 2):
                await echo_after_idle()
    finally:
        floor_proc.terminate()
        floor_proc.wait(10)
    r, lo, e, n, f = p50_us(rem), p50_us(loc), p50_us(ech), p50_us(nop), p50_us(flo)
    log(f"remote spawn+exit p50 {r:.0f} µs; local subprocess.run p50 {lo:.0f} µs; nats echo p50 {e:.0f} µs; "
        f"spawner no-op request p50 {n:.0f} µs; bare nats-py spawn floor p50 {f:.0f} µs "
        f"(its ratio {(lo + e) / f:.2f})")
    return {
        "results": {"remote_spawn_true_p50_us": round(r, 1), "local_subprocess_run_true_p50_us": round(lo, 1),
                    "nats_py_echo_p50_us": round(e, 1), "spawner_noop_request_p50_us": round(n, 1),
                    "nats_py_echo_after_idle_p50_us": round(p50_us(idle), 1),
                    "bare_nats_spawn_floor_p50_us": round(f, 1),
                    "bare_nats_spawn_floor_vs_local_plus_echo": round((lo + e) / f, 3),
                    "samples": len(rem)},
        "ratios": {"spawn_vs_local_plus_echo": round((lo + e) / r, 3)},
    }


async def spawn_paths(ctx: Context, log: Callable[[str], None]) -> dict[str, Any]:
    """Why the spawner starts processes the way it does: each local way of starting
    ``/bin/true`` (p50, start to exit reaped), and the spawner remotely.

    Local: ``fabric_ext.spawn.spawn`` + ``os.waitpid`` (what the spawner uses, with or
    without limits: clone+exec in C), ``os.posix_spawn``, ``subprocess`` without and
    with a Python ``preexec_fn`` (a real fork, Python in the child: how limits were
    once applied), and ``asyncio.create_subprocess_exec`` on the default loop and on
    uvloop.  Remote: ``rrun`` with no limit vs with one rlimit (``open_files``): the
    same path now, so the same figure.
    """
    import os
    import signal as signals

    import uvloop

    from fabric import Limits
    from fabric_ext.spawn import spawn

    n = 60 if ctx.quick else 300
    fc = ctx.client

    def posix_spawn() -> None:
        pid = os.posix_spawn("/bin/true", ["/bin/true"], os.environ, setpgroup=0,
                             setsigdef=(signals.SIGPIPE, signals.SIGXFSZ))
        os.waitpid(pid, 0)

    env = [f"{k}={v}".encode() for k, v in os.environ.items()]

    def fabric_spawn() -> None:
        pid, pidfd = spawn("/bin/true", ["/bin/true"], env)
        os.waitpid(pid, 0)
        os.close(pidfd)

    def popen() -> None:
        subprocess.run(["/bin/true"], process_group=0)

    def popen_preexec() -> None:
        subprocess.run(["/bin/true"], preexec_fn=lambda: os.setpgid(0, 0))

    async def loop_subprocess() -> None:
        proc = await asyncio.create_subprocess_exec("/bin/true")
        await proc.wait()

    def on_loop(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> list[float]:
        loop = new_loop()
        try:
            return loop.run_until_complete(timed(loop_subprocess, n))
        finally:
            loop.close()

    import concurrent.futures

    out: dict[str, float] = {}
    for name, fn in (("fabric_ext_spawn", fabric_spawn), ("posix_spawn", posix_spawn), ("subprocess", popen),
                     ("subprocess_preexec", popen_preexec)):
        out[f"local_{name}_true_p50_us"] = round(p50_us(await timed(fn, n, is_async=False)), 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a loop of its own, in a thread
        loop = asyncio.get_running_loop()
        default = await loop.run_in_executor(pool, on_loop, asyncio.new_event_loop)
        uv = await loop.run_in_executor(pool, on_loop, uvloop.new_event_loop)
    out["local_asyncio_subprocess_true_p50_us"] = round(p50_us(default), 1)
    out["local_uvloop_subprocess_true_p50_us"] = round(p50_us(uv), 1)

    async def remote(limits: Any) -> None:
        await fc.rrun(["/bin/true"], node=ctx.node, timeout=10, limits=limits)

    limited = Limits(open_files=1024)
    # names of their own: the first scenario reports remote_spawn_true_p50_us; the two
    # run the same path since fabric_ext.spawn (the rlimit costs one setrlimit in the child)
    out["remote_fast_path_true_p50_us"] = round(p50_us(await timed(lambda: remote(None), n)), 1)
    out["remote_rlimit_path_true_p50_us"] = round(p50_us(await timed(lambda: remote(limited), n)), 1)
    log(", ".join(f"{k} {v:.0f}" for k, v in out.items()))
    return {"results": out}


# -- warm pools (compute cores) ------------------------------------------------------


async def _echo_core(ctx: Context, workers: int) -> Any:
    """The test echo core (tests/cores/echo.c), built once, loaded in a warm pool on the spawner."""
    from tests._cores import TEST_CORES, build_core

    so = build_core(TEST_CORES / "echo.c", ctx.state_dir / "cores")
    return await ctx.client.load_core("echo", so, node=ctx.node, min_workers=workers, max_workers=workers)


async def warm_job_vs_nats_echo(ctx: Context, log: Callable[[str], None]) -> dict[str, Any]:
    """An empty job on a warm pool, p50, against the bare nats-py echo RTT p50.

    Both go client -> nats-server -> a process -> back; the job also crosses the rings
    to a worker process and back.  Sampled in alternating windows; ratio = echo / job
    (>= 0.67: a warm job costs at most 1.5x a bare request/reply).
    """
    core = await _echo_core(ctx, 1)
    windows, per_window = (6, 50) if ctx.quick else (20, 100)
    try:
        async def job() -> None:
            await core.run(b"")

        async def echo() -> None:
            await ctx.echo(0)

        for _ in range(50):
            await job()
            await echo()
        jobs: list[float] = []
        ech: list[float] = []
        for _ in range(windows):
            jobs += await timed(job, per_window)
            ech += await timed(echo, per_window)
    finally:
        await core.unload()
    j, e = p50_us(jobs), p50_us(ech)
    log(f"warm empty job p50 {j:.0f} µs; nats echo p50 {e:.0f} µs")
    return {
        "results": {"warm_empty_job_p50_us": round(j, 1), "warm_job_nats_py_echo_p50_us": round(e, 1),
                    "warm_job_samples": len(jobs)},
        "ratios": {"warm_job_vs_nats_echo": round(e / j, 3)},
    }


async def map_jobs_per_s(ctx: Context, log: Callable[[str], None]) -> dict[str, Any]:
    """``Core.map`` of 10,000 small (16-byte) jobs on a 2-worker warm pool: jobs per second.

    The peer in the same run: 10,000 bare nats-py requests to the echo responder, 100
    in flight (the bus's own pipelined rate).  DESIGN.md's Ray figure on this machine
    class is 1,460 no-op tasks/s.  Runs alternate; the figures are medians.
    """
    import os

    core = await _echo_core(ctx, 2)
    n, rounds = 10_000, (3 if ctx.quick else 7)
    items = [os.urandom(16) for _ in range(n)]
    nc = ctx.nc
    slots = asyncio.Semaphore(100)

    async def one_echo() -> None:
        async with slots:
            await nc.request("bench.bus.16", b"q" * 16, timeout=10)

    rates: list[float] = []
    echo_rates: list[float] = []
    try:
        assert await core.map(items[:1000]) == items[:1000]  # warm up, and check the order
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = await core.map(items)
            rates.append(n / (time.perf_counter() - t0))
            if out != items:
                raise RuntimeError("map returned wrong outputs")
            t0 = time.perf_counter()
            await asyncio.gather(*(one_echo() for _ in range(n)))
            echo_rates.append(n / (time.perf_counter() - t0))
    finally:
        await core.unload()
    rate, echo_rate = statistics.median(rates), statistics.median(echo_rates)
    log(f"map: {rate:,.0f} jobs/s (2 workers); nats-py pipelined echo: {echo_rate:,.0f} req/s; "
        "Ray (DESIGN.md): 1,460 tasks/s")
    return {
        "results": {"map_10k_jobs_per_s": round(rate), "nats_py_pipelined_echo_per_s": round(echo_rate),
                    "map_rounds": rounds},
        "ratios": {"map_jobs_per_s": round(rate), "map_vs_pipelined_echo": round(rate / echo_rate, 3)},
    }


#: every scenario, in the order they run (the pool side adds its own here)
SCENARIOS: dict[str, Callable[[Context, Callable[[str], None]], Awaitable[dict[str, Any]]]] = {
    "spawn_vs_local_plus_echo": spawn_vs_local_plus_echo,
    "spawn_paths": spawn_paths,
    "warm_job_vs_nats_echo": warm_job_vs_nats_echo,
    "map_jobs_per_s": map_jobs_per_s,
}


def start_spawner(url: str, node: str, state_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fabric.services.spawner", "--nats-url", url, "--node", node,
                             "--state-dir", str(state_dir)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(state_dir / "spawner.log", "wb"))


#: the issue's minimum for each ratio (the JSON's ``targets``, like bench/ring.py's)
TARGETS = {"spawn_vs_local_plus_echo": 1, "warm_job_vs_nats_echo": 0.67, "map_jobs_per_s": 5000}


async def run(url: str, node: str, state_dir: Path, names: list[str], quick: bool) -> dict[str, Any]:
    import nats

    from fabric import AsyncFabricClient

    results: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    async with AsyncFabricClient(url, local=False) as fc:
        await wait_ready(fc, node, timeout_s=30.0)
        nc = await nats.connect(url)
        try:
            ctx = Context(url=url, node=node, state_dir=state_dir, client=fc, nc=nc, quick=quick)
            for name in names:
                log(f"scenario {name}")
                out = await SCENARIOS[name](ctx, log)
                results.update(out.get("results", {}))
                ratios.update(out.get("ratios", {}))
        finally:
            await nc.close()
    return {"results": results, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="run only these scenarios")
    args = ap.parse_args()
    names = args.only or list(SCENARIOS)
    import uvloop

    from tests._nats import start_nats

    with tempfile.TemporaryDirectory(prefix="fabric-spawn-bench-") as tmp:
        server = start_nats(Path(tmp) / "nats", auth=False)
        node = f"bench-{secrets.token_hex(3)}"
        state = Path(tmp) / "state"
        state.mkdir()
        spawner = start_spawner(server.url, node, state)
        responder = subprocess.Popen([sys.executable, "-c", NATS_RESPONDER, server.url], stdout=subprocess.PIPE)
        try:
            assert responder.stdout is not None
            responder.stdout.readline()
            log(f"nats-server at {server.url}; spawner node {node}")
            out = uvloop.run(run(server.url, node, state, names, args.quick))
        finally:
            for proc in (spawner, responder):
                stop_process(proc)
            server.stop()
    for name, target in TARGETS.items():
        if name in out["ratios"]:
            log(f"{name}: {out['ratios'][name]} (target >= {target})")
    print(json.dumps({"bench": "spawn", **out, "targets": TARGETS,
                      "machine": machine(spawner="python -m fabric.services.spawner (uvloop)")}))


if __name__ == "__main__":
    main()
