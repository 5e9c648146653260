"""Helpers for the task layer's integration and fault tests (tests/test_tasks.py, tests/test_tasks_faults.py).

A *node* here is what ``fabric up`` starts on a machine for tasks: a spawner (its task
runner pulls ``fabric.task.pull``) and a gpu-monitor (it puts the node's record, labels
and custom resources in the registry, where the scheduler reads its capacity).
:func:`start_node` and :func:`start_scheduler` start them in this process, on the
test's loop, and :func:`one_node_fabric` a whole one-node fabric (spawner, gpu-monitor,
scheduler) for the tests of other modules that need one; :class:`Procs` starts them as processes of their own
(``python -m fabric.services.<name>``) for the tests that kill one with SIGKILL, and
stops only the PIDs it started.  :func:`ask` is a raw NATS request in JSON, as a
client in another language sends it (docs/protocol.md "Tasks").
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.errors import NoRespondersError

from fabric.protocol.headers import CONTENT_TYPE_HEADER, ERROR_CODE_HEADER, ERROR_HEADER
from fabric.schema import JSON
from fabric.schema.tasks import TaskRecord
from tests._nats import TRUSTED_ENV, creds_for, env_with_repo, trusted_config


@dataclass
class Node:
    """The in-process services of one node."""

    name: str
    services: list[Any]

    @property
    def spawner(self) -> Any:
        return self.services[0]

    async def stop(self) -> None:
        for svc in reversed(self.services):
            await svc.stop()


def settings(url: str, node: str, state: Path, role: str, *, slots: int | None = None,
             labels: dict[str, str] | None = None, resources: dict[str, float] | None = None) -> Any:
    """The settings of the *role* service of *node*, with its role's credentials."""
    from fabric.config.model import FabricConfig, TasksConfig
    from fabric.service import ServiceSettings

    config = FabricConfig(tasks=TasksConfig(labels=labels or {}, resources=resources or {}, slots=slots))
    return ServiceSettings(nats_url=url, node=node, state_dir=state, config=trusted_config(config),
                           credentials=creds_for(role))


async def start_node(url: str, state: Path, *, name: str = "", slots: int | None = None, prefetch: int = 1,
                     labels: dict[str, str] | None = None, resources: dict[str, float] | None = None) -> Node:
    """A spawner and a gpu-monitor for node *name* (random when empty); returns once both serve."""
    from fabric.services.gpu_monitor import GpuMonitorService
    from fabric.services.spawner import SpawnerService

    name = name or f"n-{secrets.token_hex(3)}"
    services = [SpawnerService(settings(url, name, state / name, "spawner", slots=slots, labels=labels,
                                        resources=resources), task_prefetch=prefetch),
                GpuMonitorService(settings(url, name, state / name, "gpu-monitor", slots=slots, labels=labels,
                                           resources=resources))]
    node = Node(name, [])
    try:
        for svc in services:
            await svc.start()
            node.services.append(svc)
    except BaseException:
        await node.stop()
        raise
    return node


@asynccontextmanager
async def one_node_fabric(url: str, state: Path, *, prefix: str = "tasks", config: Any = None,
                          trusted: bool = True) -> AsyncIterator[str]:
    """A one-node fabric in this process on the JetStream server *url*: a spawner, a gpu-monitor (the node's
    record) and a scheduler, with *config* (a FabricConfig) if given; yields the node's name (*prefix*-random).
    *trusted*: its users' code runs as the spawner (trusted_config), as the suite's interpreter needs here."""
    from fabric.config import FabricConfig
    from fabric.service import ServiceSettings
    from fabric.services.gpu_monitor import GpuMonitorService
    from fabric.services.scheduler import SchedulerService
    from fabric.services.spawner import SpawnerService

    node = f"{prefix}-{secrets.token_hex(3)}"
    services = [cls(ServiceSettings(credentials=creds_for(cls), nats_url=url, node=node, state_dir=state / cls.__name__,
                                    config=trusted_config(config or FabricConfig()) if trusted
                                    else config or FabricConfig()))
                for cls in (SpawnerService, GpuMonitorService, SchedulerService)]
    started = []
    try:
        for svc in services:
            await svc.start()
            started.append(svc)
        yield node
    finally:
        for svc in reversed(started):
            await svc.stop()


async def start_scheduler(url: str, state: Path, name: str = "") -> Any:
    from fabric.services.scheduler import SchedulerService

    name = name or f"s-{secrets.token_hex(3)}"
    svc = SchedulerService(settings(url, name, state / name, "scheduler"))
    await svc.start()
    return svc


# -- raw requests (JSON), as a client in another language makes them ---------------------------------------------


@dataclass
class Answer:
    """A reply: its JSON body, or its error code and message."""

    body: Any = None
    code: int = 0
    error: str = ""
    headers: dict[str, str] = field(default_factory=dict)


async def ask(nc: Any, verb: str, body: Any, timeout: float = 30.0) -> Answer:
    """Request ``fabric.task.<verb>`` with *body* (a dict, JSON-encoded; bytes as they are); no responders: 503."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        msg = await nc.request(f"fabric.task.{verb}", data, timeout=timeout,
                               headers={CONTENT_TYPE_HEADER: "application/json"})
    except NoRespondersError:  # no scheduler is active: as the Python client says it
        return Answer(code=503, error="no responders")
    headers = dict(msg.headers or {})
    if ERROR_HEADER in headers:
        return Answer(code=int(headers.get(ERROR_CODE_HEADER, "0")), error=headers[ERROR_HEADER], headers=headers)
    return Answer(body=json.loads(msg.data) if msg.data else None, headers=headers)


async def record(nc: Any, task_id: str) -> TaskRecord:
    answer = await ask(nc, "get", {"id": task_id})
    assert answer.code == 0, answer
    return JSON.decode(json.dumps(answer.body), TaskRecord)


async def ended(nc: Any, task_id: str, within: float = 60.0) -> TaskRecord:
    """The task's record once it has ended (``fabric.task.wait``, asked again until *within* passes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        left = max(deadline - loop.time(), 0.0)
        try:
            # short waits: one whose reply a failover or a NATS restart loses costs only this long
            answer = await ask(nc, "wait", {"id": task_id, "timeout_s": min(left, 2.0)}, timeout=min(left, 2.0) + 2)
        except Exception:  # no responders: a scheduler failing over, or NATS restarting
            answer = Answer(code=-1)
        if answer.code == 0:
            rec = JSON.decode(json.dumps(answer.body), TaskRecord)
            if rec.state in ("succeeded", "failed", "cancelled", "dead"):
                return rec
        assert loop.time() < deadline, f"task {task_id} did not end within {within} s: {answer}"
        await asyncio.sleep(0.1)


# -- services as processes of their own (for kill -9) ---------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every process below *pid* (``/proc/<pid>/task/*/children``), depth first."""
    out: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(k) for k in children.read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out.append(kid)
            out.extend(_descendants(kid))
    return out


class Procs:
    """Service processes this test started; :meth:`stop_all` ends only those (by PID).

    They stay in the test's process group: a spawner running inside the test process (:func:`start_node`) takes a
    child of another group for an orphan it adopted, and kills it.
    """

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, service: str, node: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        state = self.root / node
        state.mkdir(parents=True, exist_ok=True)
        full = env_with_repo()
        full.update(env or {})
        log = open(state / f"{service}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", f"fabric.services.{service}", "--nats-url", self.url,
                                 "--node", node, "--state-dir", str(state),
                                 "--credentials", str(creds_for(service.replace("_", "-")))],
                                env={**full, **TRUSTED_ENV}, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def start_node(self, node: str, env: dict[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
        return [self.start("spawner", node, env), self.start("gpu_monitor", node, env)]

    @staticmethod
    def kill9(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL *proc*; then its descendants (a spawner's pool workers), which a real crash would orphan."""
        below = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        """SIGTERM each (a spawner stops its own workers), SIGKILL what has not ended 15 s later."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs.clear()

    def logs(self) -> str:
        """The tail of every log of the processes started, for a failing assertion's message."""
        codes = ", ".join(f"{p.args[2]} {p.args[6]} pid {p.pid}: {p.poll()}" for p in self.procs)
        return f"exit codes: {codes}\n" + "\n".join(f"== {path}\n{path.read_text(errors='replace')[-2000:]}"
                                                   for path in self.root.glob("*/*.log"))

    def log(self, node: str, service: str) -> str:
        path = self.root / node / f"{service}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""
