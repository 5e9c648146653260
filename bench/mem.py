"""Remote memory: fabric's data plane and its NATS path beside Redis, a bare nats-py responder and a bare socket.

    python bench/mem.py [--quick] [--veth]

Starts everything it measures, on free ports: ``fabric up`` (embedded nats-server +
allocator with its data plane, timed to ready), ``redis-server`` (Debian package; see
scripts/install-bench-deps.sh), a bare nats-py responder in its own process on the same
NATS server, and the bare-socket floor (bench/_floor.c, compiled with gcc at bench time).
Prints progress to stderr and, as its last line, one JSON object
``{"bench": "mem", "mode": ..., "ratios": {...}, "targets": {...}, "results": {...},
"machine": {...}}``.  Every ratio is oriented so that above 1 means fabric is better.

Where: by default everything is on loopback.  ``--veth``: fabric, Redis, the responder and
the floor server run inside a network namespace of their own, joined to this one by a
veth pair (tests/_netns.py; needs root), and the clients stay outside, so every byte
crosses an interface as a remote client's would; the local fast path and the arena
figures are left out (nothing is local there).

How: the clients are sync ``FabricClient(local=False)`` with the data plane (unsuffixed
names) and with ``data_plane=False`` (names ending ``_nats``: the same calls through
NATS), ``AsyncFabricClient`` both ways, redis-py, nats-py and the floor client.  After a
warm-up of every client, they take turns in alternating windows (each window runs every
comparison, every contender a few hundred times in a rotated order), so machine noise
hits all alike; a figure is the median of its windows' p50s, a ratio the median of its
windows' ratios.

Ratios (peer time / fabric time, or fabric rate / peer rate):
* ``read_1k_vs_redis_get``, ``write_1k_vs_redis_set``: sync client, remote 1 KiB read /
  write p50 vs redis-py GET / SET p50.  ``_nats``: the same through NATS.
* ``rw_1m_vs_redis``: 1 MiB write + read (sum of p50s) vs SET + GET.  ``_nats`` likewise.
* ``batch_read_1k_vs_redis_pipeline``: 100 reads of 1 KiB in one ``rreadv`` of the
  AsyncFabricClient vs a redis-py pipeline of 100 GETs, items per second
  (``batch_window_ratios``: each window's ratio); ``batch_read_1k_sync_vs_redis_pipeline``
  the same with the sync client.  ``_nats`` likewise.
* ``overhead_vs_nats_echo``: what fabric adds to the bus -- an AsyncFabricClient 1 KiB
  read through NATS vs a bare nats-py request that its responder answers with 1 KiB,
  both through the same nats-server, both responders in their own process.
  ``write_1m_vs_nats_send`` (information): a 1 MiB write through NATS vs a bare request
  carrying the same megabyte.
* ``floor_read_1k_vs_redis_get``, ``floor_read_1m_vs_redis_get`` (information): Redis's
  GET p50 over the floor's read p50 -- the ratio a perfect client could reach.
  ``read_1k_vs_floor``: the floor's p50 over fabric's (how close fabric is to it, ≤ 1).
* loopback only: ``local_read_1k_vs_redis`` (the local fast path vs GET),
  ``rw_1m_local_vs_redis`` (1 MiB write + read on the allocator's host vs SET + GET),
  ``alloc_free_vs_bytearray`` (``Arena.alloc`` + ``free`` of 1 KiB vs ``bytearray(1024)``).

Figures with a target: ``read_1m_gbps`` (sync client, 1 MiB reads, 10^9 bytes per second of
the read's p50), ``fabric_up_ready_s``.  ``results`` holds every p50 (µs) and rate, the
floor's (``floor_read_1k_p50_us``, ``floor_read_1m_gbps``) among them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import _floor
from bench._common import NATS_RESPONDER, connect_options, machine, progress, stop_process, use_fabric_credentials

KIB = 1024
MIB = 1024 * 1024
BATCH = 100  # items of one rreadv / one pipeline


log = progress("mem")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def timed_loop(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# -- where the servers run: loopback, or a namespace behind a veth pair --------------------------


@dataclass(frozen=True)
class Site:
    host: str                # the address every server binds to and every client dials
    prefix: tuple[str, ...]  # the command prefix that runs a server there (``ip netns exec NS``)
    netns: str | None = None

    def cmd(self, *argv: str) -> list[str]:
        return [*self.prefix, *argv]


@contextmanager
def site(veth: bool) -> Iterator[Site]:
    if not veth:
        yield Site("127.0.0.1", ())
        return
    from tests._netns import in_netns, veth_pair

    def unavailable(reason: str) -> Any:
        raise SystemExit(f"--veth: {reason}")

    with veth_pair(unavailable) as (ns, outer_ip, inner_ip):
        log(f"veth pair: this side {outer_ip}, namespace {ns} at {inner_ip}")
        yield Site(inner_ip, tuple(in_netns(ns)), ns)


# -- peers ---------------------------------------------------------------------------------------


def start_redis(where: Site, workdir: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    """redis-server with a password (fabric runs with auth on; across the veth, Redis refuses strangers
    without one): redis-py sends AUTH once per connection, so no request pays for it."""
    exe = shutil.which("redis-server")
    if not exe:
        sys.exit("redis-server not found: run scripts/install-bench-deps.sh (Debian package redis-server)")
    # in our own namespace nothing else listens: any port below the ephemeral range is free there
    port = free_port() if where.netns is None else random.randint(20000, 29999)
    password = secrets.token_hex(16)
    proc = subprocess.Popen(
        where.cmd(exe, "--port", str(port), "--bind", where.host, "--save", "", "--appendonly", "no",
                  "--dir", str(workdir), "--proto-max-bulk-len", "64mb", "--requirepass", password),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    r = redis.Redis(host=where.host, port=port, password=password)
    for _ in range(200):
        try:
            r.ping()
            return proc, port, password
        except redis.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    sys.exit("redis-server did not start")


def fabric_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fabric.cli", *args]


def fabric_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("FABRIC_MEM_DATA_PLANE", None)  # the allocator serves its data plane, as by default
    return env


def fabric_up(where: Site, state: Path) -> tuple[str, float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(where.cmd(*fabric_cmd("up", "-d", "--nats-port", "0", "--host", where.host,
                                               "--state-dir", str(state))),
                         capture_output=True, text=True, env=fabric_env(), timeout=120)
    ready_s = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"fabric up failed:\n{out.stdout}\n{out.stderr}")
    st = json.loads((state / "state.json").read_text())
    use_fabric_credentials(st)
    return st["nats_url"], ready_s, st["node"]


def fabric_down(where: Site, state: Path) -> None:
    subprocess.run(where.cmd(*fabric_cmd("down", "--purge", "--state-dir", str(state))), capture_output=True,
                   env=fabric_env(), timeout=60)


def start_responder(where: Site, url: str) -> subprocess.Popen[bytes]:
    echo = subprocess.Popen(where.cmd(sys.executable, "-c", NATS_RESPONDER, url), stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert echo.stdout is not None
    echo.stdout.readline()
    return echo


# -- alternating windows -------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One contender's operation in a comparison: a plain call, or a coroutine function (``coro``)."""

    fn: Callable[[], Any]
    coro: bool = False


@dataclass
class Comparison:
    """Contenders doing the same thing (result key -> op), *reps* times each per window.

    *items* > 1: a batch of that many items; its window figure is the mean time (its rate
    is reported), else the window's p50.
    """

    ops: dict[str, Op]
    reps: int
    warmup: int
    items: int = 1


async def _samples(op: Op, n: int) -> list[float]:
    out = []
    perf = time.perf_counter
    if op.coro:
        for _ in range(n):
            t0 = perf()
            await op.fn()
            out.append(perf() - t0)
    else:
        fn = op.fn
        for _ in range(n):
            t0 = perf()
            fn()
            out.append(perf() - t0)
    return out


async def alternate(comparisons: dict[str, Comparison], windows: int) -> dict[str, list[float]]:
    """Warm every contender up, then *windows* rounds of every comparison: each key's per-window figure (s)."""
    for comp in comparisons.values():
        for op in comp.ops.values():
            await _samples(op, comp.warmup)
    per_window: dict[str, list[float]] = {key: [] for comp in comparisons.values() for key in comp.ops}
    for w in range(windows):
        for comp in comparisons.values():
            keys = list(comp.ops)
            k = w % len(keys)
            for key in keys[k:] + keys[:k]:  # rotated: no contender always runs first or after the same one
                times = await _samples(comp.ops[key], comp.reps)
                per_window[key].append(p50(times) if comp.items == 1 else sum(times) / len(times))
    return per_window


def window_ratio(per_window: dict[str, list[float]], peers: tuple[str, ...], ours: tuple[str, ...]) -> float:
    """The median over windows of (sum of *peers*' times) / (sum of *ours*)."""
    n = len(per_window[ours[0]])
    return statistics.median(sum(per_window[p][w] for p in peers) / sum(per_window[o][w] for o in ours)
                             for w in range(n))


# -- the measurements ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    windows: int
    reps_1k: int
    reps_64k: int
    reps_1m: int
    reps_batch: int
    warmup_1k: int
    warmup_1m: int  # a connection's first megabytes go slower (windows and buffers still growing)

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(windows=5, reps_1k=150, reps_64k=50, reps_1m=12, reps_batch=40, warmup_1k=500, warmup_1m=40)
        return cls(windows=9, reps_1k=400, reps_64k=150, reps_1m=30, reps_batch=100, warmup_1k=1000, warmup_1m=100)


async def remote_part(url: str, node: str, where: Site, redis_port: int, redis_password: str, floor_port: int,
                      plan: Plan) -> dict[str, Any]:
    """Every remote comparison in one set of alternating windows; the results (µs, items/s) and the ratios."""
    import nats
    import redis

    from fabric import AsyncFabricClient, FabricClient

    echo = start_responder(where, url)
    with ExitStack() as stack:
        stack.callback(stop_process, echo)
        fc = stack.enter_context(FabricClient(url, local=False, data_plane=True))
        fc_nats = stack.enter_context(FabricClient(url, local=False, data_plane=False))
        r = redis.Redis(host=where.host, port=redis_port, password=redis_password)
        floor = _floor.FloorClient(where.host, floor_port)
        stack.callback(floor.close)
        nc = await nats.connect(url, **connect_options())
        afc = AsyncFabricClient(url, local=False, data_plane=True)
        afc_nats = AsyncFabricClient(url, local=False, data_plane=False)
        try:
            await afc.connect()
            await afc_nats.connect()
            comparisons, check, handles = setup(fc, fc_nats, afc, afc_nats, nc, r, floor, plan)
            per_window = await alternate(comparisons, plan.windows)
            # the unsuffixed figures are the data plane's only if the bytes went there
            assert fc._dp is not None and fc._dp._idle.get(node), "the sync client did not use the data plane"
            assert afc._adp is not None and node in afc._adp._conns, "the async client did not use the data plane"
            assert fc_nats._dp is None and afc_nats._adp is None
            check()
            for h in handles:
                fc.rfree(h)
        finally:
            await afc.close()
            await afc_nats.close()
            await nc.close()

    res: dict[str, Any] = {}
    for comp in comparisons.values():
        for key in comp.ops:
            fig = statistics.median(per_window[key])
            res[key] = comp.items / fig if comp.items > 1 else fig * 1e6
    ratios: dict[str, float] = {}
    for suffix in ("", "_nats"):
        def ratio(peers: tuple[str, ...], ours: tuple[str, ...], suffix: str = suffix) -> float:
            return window_ratio(per_window, peers, tuple(o + suffix for o in ours))

        ratios["read_1k_vs_redis_get" + suffix] = ratio(("redis_get_1k_p50_us",), ("fabric_read_1k_p50_us",))
        ratios["write_1k_vs_redis_set" + suffix] = ratio(("redis_set_1k_p50_us",), ("fabric_write_1k_p50_us",))
        ratios["rw_1m_vs_redis" + suffix] = ratio(("redis_set_1m_p50_us", "redis_get_1m_p50_us"),
                                                  ("fabric_write_1m_p50_us", "fabric_read_1m_p50_us"))
        ratios["batch_read_1k_vs_redis_pipeline" + suffix] = ratio(("redis_pipeline_get_1k_items_per_s",),
                                                                   ("fabric_batch_read_1k_items_per_s",))
        ratios["batch_read_1k_sync_vs_redis_pipeline" + suffix] = ratio(
            ("redis_pipeline_get_1k_items_per_s",), ("fabric_sync_batch_read_1k_items_per_s",))
        res["read_1m_gbps" + suffix] = MIB / (res["fabric_read_1m_p50_us" + suffix] / 1e6) / 1e9
    res["batch_window_ratios"] = [round(r / f, 3) for f, r in zip(per_window["fabric_batch_read_1k_items_per_s"],
                                                                  per_window["redis_pipeline_get_1k_items_per_s"],
                                                                  strict=True)]
    ratios["overhead_vs_nats_echo"] = window_ratio(per_window, ("nats_echo_1k_rtt_p50_us",),
                                                   ("fabric_read_1k_rtt_p50_us_nats",))
    ratios["write_1m_vs_nats_send"] = window_ratio(per_window, ("nats_send_1m_rtt_p50_us",),
                                                   ("fabric_write_1m_rtt_p50_us_nats",))
    ratios["floor_read_1k_vs_redis_get"] = window_ratio(per_window, ("redis_get_1k_p50_us",), ("floor_read_1k_p50_us",))
    ratios["floor_read_1m_vs_redis_get"] = window_ratio(per_window, ("redis_get_1m_p50_us",), ("floor_read_1m_p50_us",))
    ratios["read_1k_vs_floor"] = window_ratio(per_window, ("floor_read_1k_p50_us",), ("fabric_read_1k_p50_us",))
    res["floor_read_1m_gbps"] = MIB / (res["floor_read_1m_p50_us"] / 1e6) / 1e9
    res["redis_get_1m_gbps"] = MIB / (res["redis_get_1m_p50_us"] / 1e6) / 1e9
    for suffix in ("", "_nats"):
        rw = res["fabric_write_1m_p50_us" + suffix] + res["fabric_read_1m_p50_us" + suffix]
        res["fabric_rw_1m_gb_per_s" + suffix] = 2 * MIB / (rw / 1e6) / 1e9
    res["redis_rw_1m_gb_per_s"] = 2 * MIB / ((res["redis_set_1m_p50_us"] + res["redis_get_1m_p50_us"]) / 1e6) / 1e9
    res["windows"] = plan.windows
    return {"results": res, "ratios": ratios}


def setup(fc: Any, fc_nats: Any, afc: Any, afc_nats: Any, nc: Any, r: Any, floor: _floor.FloorClient,
          plan: Plan) -> tuple[dict[str, Comparison], Callable[[], None], list[Any]]:
    """The blocks, keys and comparisons of :func:`remote_part`, a check of what they hold, and the blocks."""
    comps: dict[str, Comparison] = {}
    handles: list[Any] = []
    values: dict[int, bytes] = {}
    for size, label, reps, warmup in ((KIB, "1k", plan.reps_1k, plan.warmup_1k),
                                      (64 * KIB, "64k", plan.reps_64k, 100),
                                      (MIB, "1m", plan.reps_1m, plan.warmup_1m)):
        val = values[size] = os.urandom(size)
        buf = fc.rmalloc(size)
        handles.append(buf)
        h, key = buf.handle, f"k{label}"
        fc.rwrite(buf, val)
        r.set(key, val)
        comps[f"write_{label}"] = Comparison({
            f"fabric_write_{label}_p50_us": Op(partial(fc.rwrite, buf, val)),
            f"fabric_write_{label}_p50_us_nats": Op(partial(fc_nats.rwrite, h, val)),
            f"redis_set_{label}_p50_us": Op(partial(r.set, key, val)),
        }, reps, warmup)
        read_ops = {
            f"fabric_read_{label}_p50_us": Op(partial(fc.rread, buf, size)),
            f"fabric_read_{label}_p50_us_nats": Op(partial(fc_nats.rread, h, size)),
            f"redis_get_{label}_p50_us": Op(partial(r.get, key)),
        }
        if size != 64 * KIB:
            read_ops[f"floor_read_{label}_p50_us"] = Op(partial(floor.read, size))
        comps[f"read_{label}"] = Comparison(read_ops, reps, warmup)

    small = handles[0].handle
    comps["rtt_1k"] = Comparison({
        "fabric_read_1k_rtt_p50_us": Op(lambda: afc.rread(small, KIB), coro=True),
        "fabric_read_1k_rtt_p50_us_nats": Op(lambda: afc_nats.rread(small, KIB), coro=True),
        "fabric_write_1k_rtt_p50_us": Op(lambda: afc.rwrite(small, values[KIB]), coro=True),
        "fabric_write_1k_rtt_p50_us_nats": Op(lambda: afc_nats.rwrite(small, values[KIB]), coro=True),
        # a request about the size of a one-item READ frame, answered with 1 KiB
        "nats_echo_1k_rtt_p50_us": Op(lambda: nc.request(f"bench.bus.{KIB}", b"r" * 160, timeout=5), coro=True),
    }, plan.reps_1k, plan.warmup_1k)
    big, big_val = handles[2].handle, values[MIB]
    comps["send_1m"] = Comparison({
        "fabric_write_1m_rtt_p50_us": Op(lambda: afc.rwrite(big, big_val), coro=True),
        "fabric_write_1m_rtt_p50_us_nats": Op(lambda: afc_nats.rwrite(big, big_val), coro=True),
        # the same megabyte to the responder, answered with 2 bytes (an ACK frame is about as small)
        "nats_send_1m_rtt_p50_us": Op(lambda: nc.request("bench.bus.2", big_val, timeout=10), coro=True),
    }, plan.reps_1m, plan.warmup_1m)

    bufs = [fc.rmalloc(KIB) for _ in range(BATCH)]
    handles += bufs
    batch_vals = [os.urandom(KIB) for _ in bufs]
    fc.rwritev([(b, 0, v) for b, v in zip(bufs, batch_vals, strict=True)])
    items = [(b.handle, 0, KIB) for b in bufs]
    keys = [f"b{i}" for i in range(BATCH)]
    for k, v in zip(keys, batch_vals, strict=True):
        r.set(k, v)

    def pipeline() -> Any:
        p = r.pipeline(transaction=False)
        for k in keys:
            p.get(k)
        return p.execute()

    comps["batch_1k"] = Comparison({
        "fabric_batch_read_1k_items_per_s": Op(lambda: afc.rreadv(items), coro=True),
        "fabric_batch_read_1k_items_per_s_nats": Op(lambda: afc_nats.rreadv(items), coro=True),
        "fabric_sync_batch_read_1k_items_per_s": Op(lambda: fc.rreadv(items)),
        "fabric_sync_batch_read_1k_items_per_s_nats": Op(lambda: fc_nats.rreadv(items)),
        "redis_pipeline_get_1k_items_per_s": Op(pipeline),
    }, plan.reps_batch, 50, items=BATCH)

    def check() -> None:
        """Every contender reads what is there (a fast wrong answer would be no figure at all)."""
        for buf in handles[:3]:
            size = len(buf)
            assert fc.rread(buf, size) == fc_nats.rread(buf.handle, size) == values[size]
        floor.read(KIB)
        assert floor.last(KIB) == b"f" * KIB
        assert r.get("k1m") == values[MIB]
        assert fc.rreadv(items) == fc_nats.rreadv(items) == pipeline() == batch_vals

    return comps, check, handles


def local_part(url: str, quick: bool) -> dict[str, Any]:
    """The sync client's local fast path (the allocator's host): 1 KiB and 1 MiB."""
    from fabric import FabricClient
    from fabric.handles import parse

    res: dict[str, Any] = {}
    with FabricClient(url, local=True) as fc:
        buf = fc.rmalloc(KIB)
        fc.rwrite(buf, b"q" * KIB)
        assert fc._aio._local.view(parse(buf.handle)) is not None, "local fast path not active"
        number = 20000 if quick else 200000
        t = timeit.repeat(lambda: fc.rread(buf, KIB), number=number, repeat=5)
        res["fabric_local_read_1k_us"] = min(t) / number * 1e6
        t = timeit.repeat(lambda: fc.rwrite(buf, b"w" * KIB), number=number, repeat=5)
        res["fabric_local_write_1k_us"] = min(t) / number * 1e6
        fc.rfree(buf)
        big = fc.rmalloc(MIB)
        val = os.urandom(MIB)
        fc.rwrite(big, val)
        reps = 30 if quick else 150
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


def peers(where: Site) -> dict[str, Any]:
    """The versions of the peers this bench runs beside fabric, and the path between client and servers."""
    import msgspec

    try:
        import redis

        redis_py = redis.__version__
    except ImportError:
        redis_py = None
    parser = "hiredis" if importlib.util.find_spec("hiredis") else "python"  # redis-py parses in C with it
    redis_server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    gcc = subprocess.run([shutil.which("gcc") or "cc", "-dumpfullversion"], capture_output=True, text=True)
    extra: dict[str, Any] = {"msgspec": msgspec.__version__, "redis_py": redis_py, "redis_py_parser": parser,
                             "redis_server": redis_server.split(" sha=")[0], "gcc": gcc.stdout.strip()}
    if where.netns is not None:
        route = subprocess.run(["ip", "-o", "route", "get", where.host], capture_output=True, text=True).stdout.split()
        dev = route[route.index("dev") + 1] if "dev" in route else ""
        mtu = Path(f"/sys/class/net/{dev}/mtu").read_text().strip() if dev else "?"
        extra["path"] = f"veth pair into a network namespace (mtu {mtu})"
    else:
        extra["path"] = "loopback"
    return extra


def parse_args() -> argparse.Namespace:
    """``--quick`` as every bench takes it (bench._common), and ``--veth``."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples: finishes in well under a minute")
    ap.add_argument("--veth", action="store_true",
                    help="servers in a network namespace behind a veth pair, clients outside (needs root)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    # a SIGTERM (a timeout, a Ctrl-C from a wrapper) unwinds like an error: fabric down, the veth pair removed
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    veth = args.veth
    plan = Plan.make(args.quick)

    with tempfile.TemporaryDirectory(prefix="fabric-bench-") as tmp, site(veth) as where:
        tmpdir = Path(tmp)
        floor_exe = _floor.build(tmpdir)
        log(f"starting fabric up (embedded nats-server + allocator) on {where.host}")
        state = tmpdir / "state"
        with ExitStack() as stack:
            stack.callback(fabric_down, where, state)  # also after an up that failed half-way
            url, ready_s, node = fabric_up(where, state)
            log(f"fabric ready in {ready_s:.2f}s at {url}")
            redis_proc, redis_port, redis_password = start_redis(where, tmpdir)
            stack.callback(stop_process, redis_proc, 5.0)
            floor_proc, floor_port = _floor.start(floor_exe, where.host, list(where.prefix))
            stack.callback(stop_process, floor_proc, 5.0)
            log(f"redis-server on port {redis_port}, floor server on port {floor_port}")
            import uvloop

            log(f"alternating windows ({plan.windows}): data plane, NATS, Redis, nats-py echo, bare socket")
            remote = uvloop.run(remote_part(url, node, where, redis_port, redis_password, floor_port, plan))
            results: dict[str, Any] = {"fabric_up_ready_s": ready_s, **remote["results"]}
            ratios: dict[str, float] = remote["ratios"]
            if not veth:
                log("local fast path")
                results.update(local_part(url, args.quick))
                log("arena alloc+free vs bytearray")
                results.update(alloc_part(args.quick))
                ratios["local_read_1k_vs_redis"] = results["redis_get_1k_p50_us"] / results["fabric_local_read_1k_us"]
                ratios["rw_1m_local_vs_redis"] = (
                    (results["redis_set_1m_p50_us"] + results["redis_get_1m_p50_us"])
                    / (results["fabric_local_write_1m_p50_us"] + results["fabric_local_read_1m_p50_us"]))
                ratios["alloc_free_vs_bytearray"] = results["bytearray_1k_ns"] / results["arena_alloc_free_1k_ns"]
        machine_info = machine(**peers(where))

    targets: dict[str, float] = {"read_1k_vs_redis_get": 1.5, "write_1k_vs_redis_set": 1.5, "rw_1m_vs_redis": 1.5,
                                 "batch_read_1k_vs_redis_pipeline": 3, "read_1m_gbps": 1,
                                 "overhead_vs_nats_echo": 0.8}
    if not veth:
        targets.update({"local_read_1k_vs_redis": 50, "alloc_free_vs_bytearray": 0.5})
    for name, target in targets.items():
        value = ratios[name] if name in ratios else results[name]
        log(f"{name}: {value:.2f} (target >= {target})")
    for name in ("read_1k_vs_redis_get", "write_1k_vs_redis_set", "rw_1m_vs_redis",
                 "batch_read_1k_vs_redis_pipeline", "batch_read_1k_sync_vs_redis_pipeline"):
        log(f"{name}_nats: {ratios[name + '_nats']:.2f} (the same through NATS)")
    log(f"batch_read_1k_sync_vs_redis_pipeline: {ratios['batch_read_1k_sync_vs_redis_pipeline']:.2f}; "
        f"floor: 1 KiB read {results['floor_read_1k_p50_us']:.1f} µs, 1 MiB {results['floor_read_1m_gbps']:.2f} GB/s, "
        f"Redis GET over it {ratios['floor_read_1k_vs_redis_get']:.2f}")
    log(f"fabric up to ready: {ready_s:.2f}s (target < 1.5 s)")
    print(json.dumps({"bench": "mem", "mode": "veth" if veth else "loopback",
                      "ratios": {k: round(v, 3) for k, v in ratios.items()},
                      "targets": targets,
                      "results": {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()},
                      "machine": machine_info}))


if __name__ == "__main__":
    main()
