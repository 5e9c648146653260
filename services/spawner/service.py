"""The spawner's endpoints: spawn, wait, kill, stdin, status, list, info (one spawner per node).

Subjects (see docs/protocol.md, "Remote processes"): ``fabric.proc.spawn`` (any
node, queue group) and ``fabric.proc.<node>.<verb>`` for everything on this node.
A process id is ``<node>:<local>``, so a client reaches the process's node from the
id alone; its output and exit are published on ``fabric.proc.<node>.out.<local>``,
and on the ``stream_to`` subject a spawn request may name (the client subscribes
first, so it misses nothing).

The work is split by concern: :mod:`.procs` (a package, one module per job) runs and watches processes,
:mod:`.limits` plans what a child applies (and what the reply may call enforced),
:mod:`.sandbox` and :mod:`.cgroups` find out at start-up what this node can
really do, :mod:`.blobs` stores native executables by digest, :mod:`.orphans`
kills what a crashed predecessor left.  Compute cores and warm pools
(``fabric.core.*``) live in :mod:`.pools`; the scheduler's tasks (``fabric.task.pull``)
are run by :mod:`.tasks`.
"""

from __future__ import annotations

import builtins
import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path

import msgspec
from nats.js import JetStreamContext

from fabric.errors import BadRequest, PermissionDenied
from fabric.jetstream import JetStreamResource, task_results_bucket
from fabric.protocol import subjects
from fabric.schema import (
    KillReply,
    KillRequest,
    ProcListReply,
    ProcListRequest,
    ProcRequest,
    ProcStatus,
    Sandbox,
    SpawnerInfoReply,
    SpawnReply,
    SpawnRequest,
    StdinReply,
    StdinRequest,
    WaitRequest,
)
from fabric.service import Endpoint, FabricService, Request, ServiceSettings
from fabric.service_identity import check_owner, check_reply_subject
from fabric.signing import file_message, require

from . import cgroups as cgroups_mod
from . import orphans
from . import sandbox as sandbox_mod
from .blobs import BlobStore, node_architecture
from .limits import RLIMITS, Plan, plan
from .pools import CoreManager, PoolEnv
from .procs import ManagedProcess, ProcessTable, TableSettings, parse_signal
from .tasks import TaskRunner
from .worker_user import client_run_as, drop_home, make_home

__all__ = ["SpawnerService"]

#: a subject a client may ask output to be streamed to: plain tokens, no wildcards
_STREAM_SUBJECT = re.compile(r"^[^\s*>.]+(\.[^\s*>.]+)*$")


class SpawnerService(FabricService):
    name = "spawner"
    description = "fabric remote processes: rspawn/rwait/rkill with output streaming, limits and sandbox"

    #: true when the spawner is its own process (``python -m fabric.services.spawner``): then every
    #: child it did not start is an adopted orphan, even one in its own process group
    own_process = False

    def __init__(self, settings: ServiceSettings, *, task_slots: int | None = None, task_prefetch: int = 1) -> None:
        super().__init__(settings)
        root = Path(settings.state_dir) / "spawner"
        self.key = orphans.spawner_key(settings.node, Path(settings.state_dir))
        # probes fork: do them now, before the event loop has threads or connections
        self.caps = sandbox_mod.detect()
        self.cgroups, self.cgroup_reason = cgroups_mod.detect(self.key)
        self.blobs = BlobStore(root / "blobs")
        self.table: ProcessTable | None = None
        # fabric.core.*: warm pools of compute cores; their watchdog is one of this service's background tasks
        self.cores = CoreManager(self.node, self.log, settings.nats_url, tasks=self.tasks,
                                 env=PoolEnv.from_config(settings.config.pool),
                                 seed=self.credentials.seed if self.credentials is not None else None)
        self.cores.signing = settings.config.sandbox
        try:  # a user's warm workers run as sandbox.client_user, like their processes
            run_as = client_run_as(settings.config.sandbox.client_user, settings.config.sandbox.client_python)
        except KeyError:
            raise ValueError(f"sandbox.client_user {settings.config.sandbox.client_user!r}: no such user on this "
                             "node") from None
        self._client_run_as = run_as  # its HOME is made at start (on_start), removed at stop
        # fabric.task.pull: runs the scheduler's tasks here (started once the endpoints serve)
        self.runner = TaskRunner(self, slots=task_slots if task_slots is not None else settings.config.tasks.slots,
                                 prefetch=task_prefetch)

    def metadata(self) -> dict[str, str]:
        return {"cgroup": str(self.cgroups) if self.cgroups else "", "architecture": node_architecture()}

    def endpoints(self) -> Sequence[Endpoint]:
        ep = functools.partial(self.node_endpoint, subjects.PROC)  # fabric.proc.<node>.<verb>
        return [
            self.cluster_endpoint(subjects.PROC, subjects.Proc.SPAWN, self.spawn, name="spawn-any"),
            ep(subjects.Proc.SPAWN, self.spawn),
            ep(subjects.Proc.WAIT, self.wait),
            ep(subjects.Proc.KILL, self.kill),
            ep(subjects.Proc.STDIN, self.stdin),
            ep(subjects.Proc.STATUS, self.status),
            ep(subjects.Proc.LIST, self.list),
            ep(subjects.Proc.INFO, self.info),
            *self.cores.endpoints(),
        ]

    def side_endpoints(self) -> Sequence[Endpoint]:
        return self.cores.side_endpoints()  # core run/map: the job lane subscribes on this service's connection

    async def on_start(self) -> None:
        if self._client_run_as is not None:
            self.cores.client_run_as = make_home(self._client_run_as)
        left = orphans.reap(self.key)
        if left:
            self.log.warning("killed processes a previous spawner left behind", pids=left)
        if self.cgroups is not None:
            self.cgroups.sweep()
        settings = TableSettings(
            max_tail_in_message=max(0, self.connection.max_payload - 16384) * 3 // 8,
            on_strays=lambda pids: self.log.info("killed descendants that escaped their group", pids=pids),
            own_children=self.cores.worker_pids,
            any_group=self.own_process)
        self.table = ProcessTable(self.node, self._publish, marker=orphans.marker(self.key), cgroups=self.cgroups,
                                  settings=settings)
        self.table.start()
        await self.cores.start(self.connection)
        self.log.info("spawner ready", cgroup=str(self.cgroups) if self.cgroups else self.cgroup_reason,
                      enforceable=self._enforceable()[0])

    def jetstream_resources(self) -> Sequence[JetStreamResource]:
        # the task runner stores results too large for a task record there
        return [task_results_bucket()]

    async def on_jetstream(self, js: JetStreamContext | None) -> None:
        self.runner.js = js

    async def on_serving(self) -> None:
        self.background(self.runner.run, name="task-runner")

    async def on_stop(self) -> None:
        await self.runner.stop()
        await self.cores.stop()
        drop_home(self.cores.client_run_as)
        if self.table is not None:
            await self.table.stop()

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        await self.connection.publish(subject, data, headers=headers)

    def _table(self) -> ProcessTable:
        assert self.table is not None, "spawner not started"
        return self.table

    # -- endpoints ----------------------------------------------------------------------

    async def spawn(self, req: Request) -> SpawnReply:
        r: SpawnRequest = req.decode(SpawnRequest)
        if r.stream_to is not None and (not _STREAM_SUBJECT.match(r.stream_to) or len(r.stream_to) > 256):
            raise BadRequest(f"stream_to {r.stream_to!r} is not a valid subject (no wildcards, no spaces)")
        if req.caller is not None:
            # the process is the authenticated user's, whatever the request says; and the spawner publishes its
            # output only into that user's inbox, never onto another user's or a service's subject
            r.owner = req.caller
            check_reply_subject(req.caller, r.stream_to, "stream_to")
            r.sandbox = self.user_sandbox(req.caller, r.sandbox)
        table = self._table()
        mp, p = self.start_process(r)
        reply = SpawnReply(id=mp.id, node=self.node, pid=mp.pid, subject=mp.subject, enforced=list(p.enforced),
                           unenforced=dict(p.unenforced))
        if r.wait_s > 0:
            reply.exit = table.fit(await table.wait(mp, r.wait_s))
        return reply

    def user_sandbox(self, caller: str, sandbox: Sandbox | None) -> Sandbox | None:
        """A user's process runs as ``sandbox.client_user`` (default ``nobody``), without setuid gains, when
        this spawner is root: only a trusted caller (an admin, a service) runs code as root."""
        client_user = self.settings.config.sandbox.client_user
        if os.geteuid() != 0 or client_user in ("", "root"):  # not root, or the operator trusts users with root
            return sandbox
        if sandbox is not None and sandbox.user not in (None, client_user):
            raise PermissionDenied(f"sandbox.user {sandbox.user!r}: user {caller!r} runs processes only as "
                                   f"{client_user!r} on this node (sandbox.client_user; an admin may choose)")
        base = sandbox if sandbox is not None else Sandbox()
        return msgspec.structs.replace(base, user=client_user, no_new_privs=True)

    def start_process(self, r: SpawnRequest) -> tuple[ManagedProcess, Plan]:
        """Start *r* as ``fabric.proc.spawn`` does (the task runner's ``exec`` tasks come here too)."""
        if r.native is not None:
            require(self.settings.config.sandbox, file_message(r.native.sha256), r.native.signature,
                    f"native executable sha256 {r.native.sha256}")
        p = plan(r.limits, r.sandbox, self.caps, self.cgroups, self.cgroup_reason, strict=r.strict)
        executable = str(self.blobs.resolve(r.native)) if r.native is not None else None
        return self._table().spawn(r, p, executable), p

    def _get(self, req: Request, proc_id: str) -> ManagedProcess:
        """The process *proc_id*, if the caller may act on it: its owner, or a trusted caller (403 otherwise)."""
        mp = self._table().get(proc_id)
        check_owner(req.caller, mp.owner, f"process {proc_id}")
        return mp

    async def wait(self, req: Request) -> ProcStatus:
        r: WaitRequest = req.decode(WaitRequest)
        table = self._table()
        mp = self._get(req, r.id)
        await table.wait(mp, r.timeout_s)
        return table.status(mp)

    def kill(self, req: Request) -> KillReply:
        r: KillRequest = req.decode(KillRequest)
        sig = parse_signal(r.signal)  # a bad signal is 400 whatever the id
        table = self._table()
        mp = self._get(req, r.id)
        delivered = table.signal(mp, sig)
        return KillReply(id=mp.id, delivered=delivered, state="running" if mp.running else "exited")

    def stdin(self, req: Request) -> StdinReply:
        r: StdinRequest = req.decode(StdinRequest)
        table = self._table()
        return StdinReply(written=table.write_stdin(self._get(req, r.id), r.data, eof=r.eof))

    def status(self, req: Request) -> ProcStatus:
        table = self._table()
        return table.status(self._get(req, req.decode(ProcRequest).id))

    def list(self, req: Request) -> ProcListReply:
        r = req.decode(ProcListRequest) if req.data else ProcListRequest()
        table = self._table()
        procs = list(table.live.values()) + (list(table.finished.values()) if r.finished else [])
        owner = req.caller if req.caller is not None else r.owner  # a user sees only their own
        if owner is not None:
            procs = [mp for mp in procs if mp.owner == owner]
        # no tails in a list: thousands of them would not fit one message (status has them)
        return ProcListReply(node=self.node, processes=[table.status(mp, tails=False) for mp in procs])

    # builtins.list: inside the class, "list" names the endpoint method above
    def _enforceable(self) -> tuple[builtins.list[str], dict[str, str]]:
        ok: builtins.list[str] = []
        not_ok: dict[str, str] = {}
        for name in RLIMITS:
            if name == "processes" and self.caps.nproc_bypass:
                not_ok["limits.processes"] = "root is exempt from RLIMIT_NPROC: only with sandbox.user (non-root)"
            else:
                ok.append(f"limits.{name}")
        if self.cgroups is not None:
            ok.append("limits.mem_bytes")
        else:
            not_ok["limits.mem_bytes"] = self.cgroup_reason
        ok.append("limits.wall_s")
        for name, reason in (("no_new_privs", self.caps.no_new_privs), ("network", self.caps.network),
                             ("user", self.caps.user)):
            if reason is None:
                ok.append(f"sandbox.{name}")
            else:
                not_ok[f"sandbox.{name}"] = reason
        return ok, not_ok

    def info(self, req: Request) -> SpawnerInfoReply:
        table = self._table()
        ok, not_ok = self._enforceable()
        return SpawnerInfoReply(node=self.node, running=len(table.live), finished=len(table.finished),
                                spawned=table.spawned, architecture=node_architecture(), os="linux",
                                enforceable=ok, not_enforceable=not_ok,
                                cgroup=str(self.cgroups) if self.cgroups else "", blobs=self.blobs.count())

