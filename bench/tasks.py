"""Durable tasks (issue 14): fabric's scheduler beside Ray and Dask, in one run.

Starts, on free loopback ports and in temporary state directories: ``fabric up``
(embedded nats-server, every service, the scheduler included), Ray
(``ray.init(num_cpus=2)``, no dashboard) and a Dask ``LocalCluster`` (processes, 2
workers x 1 thread), times each start, warms each one, then measures:

* ``task_rtt``: a no-op task from submit to its result at the client, sequential:
  fabric's durable default ``fc.submit(noop).result()``, ``ray.get(f.remote())``,
  ``client.submit(f, pure=False).result()``; alternating windows, the median of the
  windows' p50s.
* ``tasks_per_s``: N no-op tasks (10,000; ``--quick`` 2,000): ``fc.map`` and every
  result, Ray ``[f.remote(i) ...]`` + ``ray.get``, Dask ``client.map`` + ``gather``, and
  ``Core.map`` on the same fabric's built-in Python pool (``fabric.python``, no
  scheduler, nothing durable: what durability costs); alternating rounds, medians.
  Every timed window starts once the machine has settled (:func:`settle`: under 25 %
  CPU, at most 5 s), so one system's clean-up is not charged to the next.
* ``memory``: a second ``fabric up`` with no spawner (``--services gpu-monitor,scheduler``)
  so tasks stay queued; the scheduler's RSS (psutil) before and after N queued no-op
  tasks (100,000; ``--quick`` 20,000); bytes per queued task.
* ``failover``: a second scheduler beside the first, a steady stream of tasks (100 a
  second, none waiting for another), ``kill -9`` of the active scheduler (the lease's
  holder among the ``$SRV.INFO`` metadata pids); seconds from the kill to the first
  result of a task submitted after it (a result already published by the killed one
  does not count), the window in which submits were refused (503), and what became
  of the tasks in flight at the kill.

Each section is independent: one that fails (or whose fabric side does not exist
yet) reports its error under ``errors`` and the others still run.  Progress goes to
stderr; the last line is one JSON object (docs/benchmarks.md "Tasks").

    .venv/bin/python bench/tasks.py [--quick] [--only fabric,ray,dask,memory,failover]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import connect_options, machine, progress, stop_process, use_fabric_credentials

log = progress("tasks")

TARGETS = {"task_rtt_vs_ray": 2, "task_rtt_vs_dask": 10, "tasks_per_s_vs_ray": 5}
MEM_TARGET_BYTES_PER_TASK = 2048
FAILOVER_TARGET_S = 3.0
STREAM_EVERY_S = 0.01  # the failover stream: 100 tasks a second
SCHEDULER = "scheduler"


def noop(x: Any = None) -> None:
    """The task every system runs: nothing (it takes the item so ``map`` can pass one)."""
    return None


# -- helpers -------------------------------------------------------------------------


def p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def timed_calls(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def fabric_side_missing() -> str | None:
    """Why the fabric side cannot be measured in this tree (None: it can)."""
    if importlib.util.find_spec("fabric.client.tasks") is None:
        return "fabric/client/tasks.py does not exist yet (FabricClient.submit/map)"
    if importlib.util.find_spec("fabric.services.scheduler") is None:
        return "services/scheduler/ (fabric.services.scheduler) does not exist yet"
    from fabric import FabricClient

    for name in ("submit", "map"):
        if not hasattr(FabricClient, name):
            return f"FabricClient.{name} does not exist yet"
    return None


def fabric_env() -> dict[str, str]:
    """The environment of ``fabric up``: the scheduler added to its services if it is not one yet."""
    from fabric.launch import SERVICE_MODULES_ENV
    from fabric.supervisor import SERVICES

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if SCHEDULER not in SERVICES:
        env[SERVICE_MODULES_ENV] = json.dumps({SCHEDULER: "fabric.services.scheduler"})
    return env


def fabric_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fabric.cli", *args]


def fabric_up(state: Path, services: str | None = None) -> tuple[str, float, str]:
    """``fabric up -d`` on a free port in *state*: (NATS URL, seconds to ready, node name)."""
    extra = ["--services", services] if services else []
    t0 = time.perf_counter()
    out = subprocess.run(fabric_cmd("up", "-d", "--nats-port", "0", "--state-dir", str(state), *extra),
                         capture_output=True, text=True, env=fabric_env(), timeout=120)
    ready_s = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"fabric up failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    st = json.loads((state / "state.json").read_text())
    use_fabric_credentials(st)
    return st["nats_url"], ready_s, st["node"]


def fabric_down(state: Path) -> None:
    subprocess.run(fabric_cmd("down", "--purge", "--state-dir", str(state)), capture_output=True,
                   env=fabric_env(), timeout=90)


@contextmanager
def fabric_running(state: Path, services: str | None = None) -> Iterator[tuple[str, float, str]]:
    try:
        yield fabric_up(state, services)
    finally:
        fabric_down(state)


def service_infos(url: str, name: str, wait_s: float = 0.5) -> list[dict[str, Any]]:
    """Every ``$SRV.INFO.<name>`` reply that arrives within *wait_s* (all instances answer)."""
    import nats

    async def ask() -> list[dict[str, Any]]:
        nc = await nats.connect(url, **connect_options())
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish(f"$SRV.INFO.{name}", b"", reply=inbox)
            out: list[dict[str, Any]] = []
            deadline = time.monotonic() + wait_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except TimeoutError:
                    break
                except Exception:  # nats' own timeout class on older nats-py
                    break
                out.append(json.loads(msg.data))
            return out
        finally:
            await nc.close()

    return asyncio.run(ask())


def wait_first_task(fc: Any, timeout_s: float = 60.0) -> float:
    """Submit no-op tasks until one comes back (the scheduler elected and a node pulling); seconds taken."""
    t0 = time.perf_counter()
    last: Exception | None = None
    while time.perf_counter() - t0 < timeout_s:
        try:
            fc.submit(noop).result(timeout=10)
            return time.perf_counter() - t0
        except Exception as exc:  # 503 while no scheduler is active yet, a timeout while nodes register
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"no task result within {timeout_s:g}s of fabric up: {last!r}")


def wait_recorded(fc: Any, task_id: str, timeout_s: float = 120.0) -> None:
    """Wait until the scheduler knows *task_id* (``fc.task`` finds its record)."""
    t0 = time.perf_counter()
    while True:
        try:
            fc.task(task_id)
            return
        except Exception:
            if time.perf_counter() - t0 > timeout_s:
                raise
            time.sleep(0.2)


def rss_of(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def settled_rss(pid: int, max_s: float = 30.0) -> int:
    """The RSS of *pid* once two samples 0.5 s apart differ by under 0.5 % (or after *max_s*)."""
    prev, t0 = rss_of(pid), time.monotonic()
    while time.monotonic() - t0 < max_s:
        time.sleep(0.5)
        cur = rss_of(pid)
        if abs(cur - prev) < 0.005 * prev:
            return cur
        prev = cur
    return prev


# -- the systems -----------------------------------------------------------------------


class Warmed:
    """A system under test: ``rtt()`` runs one no-op task to its result, ``map(n)`` n of them."""

    def rtt(self) -> None:
        raise NotImplementedError

    def map(self, n: int) -> None:
        raise NotImplementedError

    def warm(self) -> None:
        """200 sequential tasks and a map of 1,000, before anything is measured."""
        for _ in range(200):
            self.rtt()
        self.map(1000)


class Fabric(Warmed):
    """``fabric up`` with the scheduler, a sync client, and the node's Python pool for ``Core.map``."""

    def __init__(self, state: Path) -> None:
        from fabric import FabricClient

        self.state = state
        self.core: Any = None
        t0 = time.perf_counter()
        self.url, self.up_s, self.node = fabric_up(state)
        self.fc = FabricClient(self.url, timeout=60.0).connect()
        try:
            wait_first_task(self.fc)
        except Exception:
            self.close()
            raise
        self.first_task_s = time.perf_counter() - t0  # as Ray's: from the start to the first result

    def rtt(self) -> None:
        self.fc.submit(noop).result(timeout=30)

    def map(self, n: int) -> None:
        for f in self.fc.map(noop, range(n)):
            f.result(timeout=120)

    def core_map(self, n: int) -> None:
        """``n`` calls of noop through the Python pool, pickled and unpickled as ``Core.call`` does."""
        import pickle

        import cloudpickle

        outs = self.core.map([cloudpickle.dumps((noop, (i,), {})) for i in range(n)])
        for out in outs:
            pickle.loads(out)  # noqa: S301 - our own function's result

    def load_core(self) -> None:
        """The node's Python pool, 2 workers (as the peers' 2 CPUs), warmed."""
        import cloudpickle

        self.core = self.fc.load_python_core(min_workers=2, max_workers=2, node=self.node)
        self.core.map([cloudpickle.dumps((noop, (i,), {})) for i in range(1000)])

    def close(self) -> None:
        try:
            if self.core is not None:
                self.core.unload()
            self.fc.close()
        finally:
            fabric_down(self.state)


class Ray(Warmed):
    def __init__(self) -> None:
        import ray

        self.ray = ray
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.init_s = time.perf_counter() - t0
        self.f = ray.remote(noop)
        ray.get(self.f.remote())
        self.first_task_s = time.perf_counter() - t0

    def rtt(self) -> None:
        self.ray.get(self.f.remote())

    def map(self, n: int) -> None:
        self.ray.get([self.f.remote(i) for i in range(n)])

    def close(self) -> None:
        self.ray.shutdown()


class Dask(Warmed):
    def __init__(self) -> None:
        from dask.distributed import Client, LocalCluster

        t0 = time.perf_counter()
        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                    host="127.0.0.1", scheduler_port=0)
        self.client = Client(self.cluster)
        self.start_s = time.perf_counter() - t0
        self.client.submit(noop, pure=False).result()
        self.first_task_s = time.perf_counter() - t0

    def rtt(self) -> None:
        self.client.submit(noop, pure=False).result()

    def map(self, n: int) -> None:
        self.client.gather(self.client.map(noop, range(n), pure=False))

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


# -- sections ----------------------------------------------------------------------------


#: before each timed window the machine must be this idle (percent of all CPUs), or SETTLE_MAX_S must pass
SETTLE_BELOW_PERCENT = 25.0
SETTLE_MAX_S = 5.0


def settle() -> float:
    """Wait until the machine is about idle: the system timed before may still be cleaning up (Dask releasing
    10,000 futures, Ray's workers collecting), and that would be charged to whichever system runs next.
    The same wait precedes every system's window; returns how long it took."""
    import psutil

    t0 = time.perf_counter()
    while psutil.cpu_percent(interval=0.2) > SETTLE_BELOW_PERCENT and time.perf_counter() - t0 < SETTLE_MAX_S:
        pass
    return time.perf_counter() - t0


def compare(systems: dict[str, Any], n_seq: int, n_tasks: int, rounds: int) -> dict[str, Any]:
    """Sequential RTT windows and map rounds, alternating between the systems (order rotating), each
    after the machine settled (:func:`settle`)."""
    names = list(systems)
    p50s: dict[str, list[float]] = {k: [] for k in names}
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            settle()
            p50s[name].append(p50_us(timed_calls(systems[name].rtt, n_seq)))
        for name in order:
            settle()
            t0 = time.perf_counter()
            systems[name].map(n_tasks)
            rates[name].append(n_tasks / (time.perf_counter() - t0))
        log(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{k} p50 {p50s[k][-1]:.0f} us, {rates[k][-1]:.0f} tasks/s" for k in names))
    out: dict[str, Any] = {}
    for k in names:
        out[f"{k}_task_rtt_p50_us"] = statistics.median(p50s[k])
        out[f"{k}_tasks_per_s"] = statistics.median(rates[k])
        out[f"rounds_{k}_task_rtt_p50_us"] = [round(x, 1) for x in p50s[k]]
        out[f"rounds_{k}_tasks_per_s"] = [round(x) for x in rates[k]]
    return out


def core_map_rounds(fab: Fabric, n_tasks: int, rounds: int) -> dict[str, Any]:
    fab.load_core()
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fab.core_map(n_tasks)
        rates.append(n_tasks / (time.perf_counter() - t0))
    log(f"Core.map on fabric.python: {statistics.median(rates):.0f} tasks/s")
    return {"fabric_core_map_tasks_per_s": statistics.median(rates),
            "rounds_fabric_core_map_tasks_per_s": [round(x) for x in rates]}


def memory_section(tmp: Path, n: int) -> dict[str, Any]:
    """Scheduler RSS per queued task, no spawner (nothing runs, everything stays queued)."""
    from fabric import FabricClient

    state = tmp / "state-mem"
    with fabric_running(state, services=f"gpu-monitor,{SCHEDULER}") as (url, _, _):
        pid = 0
        for _ in range(100):  # the scheduler answers $SRV.INFO once it is up
            infos = service_infos(url, SCHEDULER)
            if infos:
                pid = int(infos[0]["metadata"]["pid"])
                break
            time.sleep(0.2)
        if not pid:
            raise RuntimeError("no scheduler answered $SRV.INFO within 20 s")
        with FabricClient(url, timeout=120.0) as fc:
            t0 = time.perf_counter()
            while True:  # the first map is accepted once the scheduler is active and the node registered
                try:
                    fc.map(noop, range(1000))  # warm: these stay queued too, before the baseline
                    break
                except Exception as exc:
                    if time.perf_counter() - t0 > 30:
                        raise RuntimeError(f"the scheduler took no tasks within 30 s: {exc!r}") from exc
                    time.sleep(0.2)
            before = settled_rss(pid)
            t1 = time.perf_counter()
            futs = fc.map(noop, range(n))
            # map returns once its batches are sent: the last task's record says they were taken
            wait_recorded(fc, futs[-1].id)
            submit_s = time.perf_counter() - t1
            after = settled_rss(pid)
            refused = [f for f in futs if f.done()]
            if refused:
                raise RuntimeError(f"{len(refused)} of {n} tasks ended instead of queueing: "
                                   f"{refused[0].exception(timeout=1)!r}")
            del futs
    per_task = (after - before) / n
    log(f"scheduler RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB for {n} queued tasks: "
        f"{per_task:.0f} bytes/task (target <= {MEM_TARGET_BYTES_PER_TASK})")
    return {"scheduler_rss_before_bytes": before, "scheduler_rss_after_bytes": after, "queued_tasks": n,
            "scheduler_bytes_per_queued_task": per_task, "queued_map_submit_s": submit_s}


def lease_holder_pid(url: str) -> int | None:
    """The pid in the scheduler lease (KV ``fabric_scheduler``, key ``active``), if the scheduler keeps one."""
    import nats

    try:
        from fabric.services.scheduler.lease import LEASE_BUCKET, LEASE_KEY
    except ImportError:
        return None

    async def ask() -> int | None:
        nc = await nats.connect(url, **connect_options())
        try:
            kv = await nc.jetstream().key_value(LEASE_BUCKET)
            entry = await kv.get(LEASE_KEY)
            return int(json.loads(entry.value or b"{}")["pid"])
        except Exception:
            return None
        finally:
            await nc.close()

    return asyncio.run(ask())


def active_scheduler_pid(url: str, supervised_pid: int) -> tuple[int, str]:
    """The active scheduler's pid (one of the ``$SRV.INFO`` metadata pids) and how it was told apart."""
    infos = service_infos(url, SCHEDULER)
    pids = {int((info.get("metadata") or {}).get("pid", 0)) for info in infos}
    if len(infos) < 2:
        raise RuntimeError(f"expected two schedulers on $SRV.INFO, {len(infos)} answered")
    for info in infos:
        meta = info.get("metadata") or {}
        role = str(meta.get("role", meta.get("state", ""))).lower()
        if role in ("active", "leader") or str(meta.get("active", "")).lower() == "true":
            return int(meta["pid"]), "$SRV.INFO metadata role"
    holder = lease_holder_pid(url)
    if holder in pids:
        return holder, "the lease's holder, one of the $SRV.INFO metadata pids"
    # the supervised scheduler started first, so it took the lease
    return supervised_pid, "started first (neither metadata nor the lease says which is active)"


def join_as(state: Path, url: str, node: str, node_dir: Path) -> Path:
    """Join node *node* (its keys in *node_dir*) to the fabric of *state* with its join token; its scheduler's
    credentials file."""
    import asyncio

    from fabric.auth import AuthRealm
    from fabric.join import request_join
    from fabric.state import StateDir

    out = subprocess.run(fabric_cmd("join-token", "--state-dir", str(state)), capture_output=True, text=True,
                         env=fabric_env(), timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"fabric join-token failed: {out.stderr}")
    realm = AuthRealm(StateDir(node_dir), node)
    realm.ensure()
    asyncio.run(request_join(url, out.stdout.strip(), realm))
    return realm.service_credentials("scheduler")


def failover_section(tmp: Path) -> dict[str, Any]:
    from fabric import FabricClient
    from fabric.launch import module_launch

    state = tmp / "state-failover"
    with fabric_running(state) as (url, _, node):
        st = json.loads((state / "state.json").read_text())
        supervised_pid = int(st["services"][SCHEDULER]["pid"])
        standby_dir = tmp / "standby"
        standby_dir.mkdir()
        args = ["--nats-url", url, "--node", f"{node}-standby", "--state-dir", str(standby_dir)]
        if st.get("credentials"):  # auth on: the standby's node joins with the fabric's token, as another machine would
            args += ["--credentials", str(join_as(state, url, f"{node}-standby", standby_dir))]
        launch = module_launch("fabric.services.scheduler", args, cwd=standby_dir, env=fabric_env())
        standby = subprocess.Popen(launch.argv, cwd=launch.cwd, env=launch.env, stdout=subprocess.DEVNULL,
                                   stderr=open(standby_dir / "scheduler.log", "wb"))
        try:
            with FabricClient(url, timeout=30.0) as fc:
                wait_first_task(fc)
                for _ in range(100):
                    if len(service_infos(url, SCHEDULER)) >= 2:
                        break
                    time.sleep(0.2)
                # a steady stream that never waits on a result: one no-op task every STREAM_EVERY_S,
                # each future's end stamped by a done callback (a task lost in the kill blocks nothing)
                ends: list[tuple[float, float, str]] = []  # (submitted, ended at the client, error or "")
                lock = threading.Lock()
                stop = threading.Event()
                submitted: list[float] = []
                futures: list[Any] = []

                def record(t_sub: float) -> Callable[[Any], None]:
                    def cb(f: Any) -> None:
                        exc = f.exception(timeout=0)
                        with lock:
                            ends.append((t_sub, time.monotonic(), "" if exc is None else repr(exc)[:200]))
                    return cb

                def stream() -> None:
                    while not stop.is_set():
                        t_sub = time.monotonic()
                        submitted.append(t_sub)
                        fut = fc.submit(noop)
                        futures.append(fut)
                        fut.add_done_callback(record(t_sub))
                        time.sleep(max(0.0, STREAM_EVERY_S - (time.monotonic() - t_sub)))

                streamer = threading.Thread(target=stream, daemon=True)
                streamer.start()
                time.sleep(2.0)  # a steady stream before the kill
                pid, how = active_scheduler_pid(url, supervised_pid)
                t_kill = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                log(f"killed the active scheduler (pid {pid}, {how}); waiting for the next result")

                def fresh_ok() -> int:
                    with lock:
                        return sum(1 for sub, _, err in ends if sub > t_kill and not err)

                deadline = t_kill + 20.0
                while time.monotonic() < deadline and fresh_ok() < 50:
                    time.sleep(0.01)
                stop.set()
                streamer.join(5)
                # the last tasks' results: every one ends, or what it is after 15 s is reported
                settle_by = time.monotonic() + 15.0
                while time.monotonic() < settle_by and not all(f.done() for f in futures):
                    time.sleep(0.05)
                late: list[str] = []
                for f in futures:
                    if not f.done():
                        try:
                            rec = fc.task(f.id)
                            late.append(f"{f.id}: {rec.state}, attempts "
                                        f"{[(a.node, a.outcome) for a in rec.attempts]}")
                        except Exception as exc:  # noqa: BLE001 - reported, not raised
                            late.append(f"{f.id}: unreadable ({exc!r})"[:200])
        finally:
            stop_process(standby)
    with lock:
        got = list(ends)
    ok = [(sub, end) for sub, end, err in got if not err]
    fresh = [end for sub, end in ok if sub > t_kill]
    if not fresh:
        raise RuntimeError(f"no task submitted after killing the active scheduler succeeded within 20 s; "
                           f"errors: {[e for _, _, e in got if e][-3:]}")
    gap = min(fresh) - t_kill
    in_flight = [(sub, end) for sub, end in ok if sub <= t_kill < end]
    pending_at_kill = sum(1 for sub in submitted if sub <= t_kill) - sum(1 for sub, end, _ in got
                                                                            if sub <= t_kill and end <= t_kill)
    errs = [e for _, _, e in got if e]
    log(f"failover: first result of a task submitted after kill -9 came {gap:.2f} s after it "
        f"(target <= {FAILOVER_TARGET_S:g}); {len(in_flight)} of {pending_at_kill} tasks in flight at the kill "
        f"succeeded later, {len(errs)} tasks failed")
    return {"failover_next_result_s": gap, "failover_killed": how,
            "failover_tasks_in_flight_at_kill": pending_at_kill,
            "failover_in_flight_succeeded": len(in_flight),
            "failover_in_flight_last_result_s": max((end for _, end in in_flight), default=t_kill) - t_kill,
            # until when (after the kill) submits were refused: no scheduler active (503)
            "failover_submits_refused_until_s": max((sub for sub, _, e in got if "no service answers" in e),
                                                    default=t_kill) - t_kill,
            "failover_tasks_submitted": len(submitted), "failover_tasks_failed": len(errs),
            "failover_unfinished": len(submitted) - len(got), "failover_error_sample": errs[:3],
            # tasks whose future had not ended 15 s after the stream stopped, with their records
            "failover_late": late[:5]}


def run_section(name: str, fn: Callable[[], dict[str, Any]], results: dict[str, Any],
                errors: dict[str, str]) -> None:
    log(f"section {name}")
    try:
        results.update(fn())
    except Exception as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"[:2000]
        log(f"section {name} failed: {errors[name]}")
        traceback.print_exc(file=sys.stderr)


# The floor of the design, measured with bare nats-py (uvloop), no fabric code: a "scheduler"
# process that, per task, writes a record to a JetStream KV bucket (awaiting the ack), asks a
# "node" process to run it (one request/reply), writes the result record (awaiting the ack) and
# then answers the client.  That is the least a durable task costs over NATS from Python -- two
# JetStream round trips and two request/reply hops, each through nats-server -- without any
# queue, placement, pulling, pickling or warm worker.
FLOOR_NODE = r"""
import asyncio, sys, uvloop, nats
from fabric.credentials import find_credentials
_creds = find_credentials()  # $FABRIC_CREDENTIALS: the fabric's admin
OPTS = _creds.connect_options() if _creds else {}
async def main():
    nc = await nats.connect(sys.argv[1], **OPTS)
    async def run(msg):
        await msg.respond(b"r")
    await nc.subscribe("bench.floor.run", cb=run)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""
FLOOR_SCHEDULER = r"""
import asyncio, sys, uvloop, nats
from fabric.credentials import find_credentials
_creds = find_credentials()  # $FABRIC_CREDENTIALS: the fabric's admin
OPTS = _creds.connect_options() if _creds else {}
from nats.js.api import KeyValueConfig, StorageType
async def main():
    nc = await nats.connect(sys.argv[1], **OPTS)
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket="bench_floor", history=1, storage=StorageType.FILE))
    n = 0
    async def submit(msg):
        nonlocal n
        n += 1
        key = f"t{n}"
        rev = await kv.create(key, b"queued")             # durable before it runs
        out = await nc.request("bench.floor.run", msg.data, timeout=5)
        await kv.update(key, b"succeeded:" + out.data, last=rev)  # the result, compare-and-swap
        await msg.respond(out.data)
    async def on_submit(msg):
        asyncio.ensure_future(submit(msg))  # requests run side by side, as a service's do
    await nc.subscribe("bench.floor.submit", cb=on_submit)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def floor_section(tmp: Path, n_seq: int) -> dict[str, Any]:
    """The bare durable chain's sequential p50 (see FLOOR_SCHEDULER), on a nats-server of its own."""
    import socket

    import nats as nats_mod
    import uvloop

    from fabric.nats_server import find_binary

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = tmp / "floor-js"
    server = subprocess.Popen([find_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    procs: list[subprocess.Popen[str]] = []
    try:
        time.sleep(0.5)
        for script in (FLOOR_NODE, FLOOR_SCHEDULER):
            proc = subprocess.Popen([sys.executable, "-c", script, url], stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a floor process did not start")

        async def measure() -> list[float]:
            nc = await nats_mod.connect(url)
            try:
                for _ in range(50):
                    await nc.request("bench.floor.submit", b"x", timeout=5)
                out = []
                for _ in range(n_seq):
                    t0 = time.perf_counter()
                    await nc.request("bench.floor.submit", b"x", timeout=5)
                    out.append(time.perf_counter() - t0)
                return out
            finally:
                await nc.close()

        samples = uvloop.run(measure())
        return {"floor_durable_chain_rtt_p50_us": p50_us(samples)}
    finally:
        for proc in procs:
            stop_process(proc)
        stop_process(server)


def peers() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {}
    for pkg in ("ray", "dask", "distributed", "psutil", "cloudpickle"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


SECTIONS = ("fabric", "ray", "dask", "floor", "memory", "failover")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tasks and rounds: finishes in about 3 minutes")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated systems and sections to run (default: all of {','.join(SECTIONS)})")
    args = ap.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    n_seq, n_tasks, rounds, n_queued = (100, 2000, 2, 20_000) if args.quick else (400, 10_000, 3, 100_000)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    missing = fabric_side_missing()
    if missing:
        log(f"fabric side not measured: {missing}")
        for name in ("fabric", "memory", "failover"):
            errors[name] = f"not measured: {missing}"

    with tempfile.TemporaryDirectory(prefix="fabric-bench-tasks-") as tmp_s:
        tmp = Path(tmp_s)
        systems: dict[str, Any] = {}
        try:
            if not missing and "fabric" in only:
                def start_fabric() -> dict[str, Any]:
                    log("starting fabric up (embedded nats-server, services, scheduler)")
                    fab = systems["fabric"] = Fabric(tmp / "state")
                    log(f"fabric up ready in {fab.up_s:.2f}s, first task {fab.first_task_s:.2f}s; warming")
                    fab.warm()
                    return {"fabric_up_ready_s": fab.up_s, "fabric_up_to_first_task_s": fab.first_task_s}

                run_section("fabric", start_fabric, results, errors)

            def start_ray() -> dict[str, Any]:
                log("starting Ray (num_cpus=2, no dashboard)")
                ray = systems["ray"] = Ray()
                log(f"ray.init {ray.init_s:.2f}s, first task {ray.first_task_s:.2f}s; warming")
                ray.warm()
                return {"ray_init_s": ray.init_s, "ray_init_to_first_task_s": ray.first_task_s}

            def start_dask() -> dict[str, Any]:
                log("starting Dask LocalCluster (2 worker processes x 1 thread)")
                dask = systems["dask"] = Dask()
                log(f"LocalCluster + Client {dask.start_s:.2f}s, first task {dask.first_task_s:.2f}s; warming")
                dask.warm()
                return {"dask_start_s": dask.start_s, "dask_start_to_first_task_s": dask.first_task_s}

            if "ray" in only:
                run_section("ray", start_ray, results, errors)
            if "dask" in only:
                run_section("dask", start_dask, results, errors)
            if systems:
                run_section("compare", lambda: compare(systems, n_seq, n_tasks, rounds), results, errors)
            if "fabric" in systems:
                run_section("core_map", lambda: core_map_rounds(systems["fabric"], n_tasks, rounds), results, errors)
        finally:
            for name, system in systems.items():
                try:
                    system.close()
                except Exception as exc:
                    log(f"closing {name}: {exc!r}")
        if "floor" in only:
            run_section("floor", lambda: floor_section(tmp, n_seq), results, errors)
        if not missing and "memory" in only:
            run_section("memory", lambda: memory_section(tmp, n_queued), results, errors)
        if not missing and "failover" in only:
            run_section("failover", lambda: failover_section(tmp), results, errors)

    def ratio(num: str, den: str) -> float | None:
        a, b = results.get(num), results.get(den)
        return a / b if a and b else None

    ratios = {
        "task_rtt_vs_ray": ratio("ray_task_rtt_p50_us", "fabric_task_rtt_p50_us"),
        "task_rtt_vs_dask": ratio("dask_task_rtt_p50_us", "fabric_task_rtt_p50_us"),
        "tasks_per_s_vs_ray": ratio("fabric_tasks_per_s", "ray_tasks_per_s"),
        "tasks_per_s_vs_dask": ratio("fabric_tasks_per_s", "dask_tasks_per_s"),
        "durable_vs_core_map": ratio("fabric_tasks_per_s", "fabric_core_map_tasks_per_s"),
        "fabric_up_vs_ray_init": ratio("ray_init_s", "fabric_up_ready_s"),
        "first_task_vs_ray": ratio("ray_init_to_first_task_s", "fabric_up_to_first_task_s"),
        # what the design's floor (bare nats-py, two JetStream writes and two hops) allows against Ray and Dask
        "floor_rtt_vs_ray": ratio("ray_task_rtt_p50_us", "floor_durable_chain_rtt_p50_us"),
        "floor_rtt_vs_dask": ratio("dask_task_rtt_p50_us", "floor_durable_chain_rtt_p50_us"),
        "task_rtt_vs_floor": ratio("floor_durable_chain_rtt_p50_us", "fabric_task_rtt_p50_us"),
    }
    for name, target in TARGETS.items():
        v = ratios[name]
        log(f"{name}: {'missing' if v is None else f'{v:.2f}'} (target >= {target})")
    print(json.dumps({"bench": "tasks",
                      "ratios": {k: None if v is None else round(v, 3) for k, v in ratios.items()},
                      "targets": {**TARGETS, "scheduler_bytes_per_queued_task_max": MEM_TARGET_BYTES_PER_TASK,
                                  "failover_next_result_s_max": FAILOVER_TARGET_S},
                      "results": {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()},
                      "errors": errors,
                      "machine": machine(**peers(), sequential_tasks=n_seq, tasks=n_tasks, rounds=rounds,
                                         queued_tasks=n_queued)}))


if __name__ == "__main__":
    main()
