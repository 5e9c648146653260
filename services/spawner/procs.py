"""The processes one spawner runs: starting them fast, streaming their output, ending them whole.

Starting.  Every process starts through :func:`fabric_ext.spawn.spawn`: clone with
``CLONE_VM|CLONE_VFORK`` and exec in C, no Python in the child.  Between the two the
child makes system calls only: its own process group, default signal dispositions,
stdio, close-on-exec for every other descriptor (the spawner's NATS socket, rings
and pidfds never cross exec), and what the :class:`limits.Plan` asks for -- cgroup,
network namespace, rlimits, user switch, parent-death signal, no_new_privs.  A step
that fails comes back with its errno before the spawn returns, so what the reply
calls enforced was applied, and a process with limits starts as fast as one
without.  The clone hands back a pidfd (``CLONE_PIDFD``).

Watching.  The exit arrives through a pidfd (``os.pidfd_open``) registered with
the event loop, stdout and stderr through non-blocking pipes, all with
``loop.add_reader``: no thread, no SIGCHLD handler, no child watcher, and nobody
else's children are reaped (we only ``wait4`` our own pids).

Ending whole.  When the leader exits, is killed, times out, or the spawner
stops, the whole process group gets SIGKILL -- while the leader is still an
unreaped zombie, so its pid (the group id) cannot have been reused -- plus every
descendant psutil saw outside the group and every member of the process's
cgroup when it has one.  Only then is the leader reaped and, once both pipes
reach EOF (bounded by :data:`PIPE_DRAIN_S`), the exit published.

No orphans.  A descendant that left the group (``setsid()``) is found a moment
after its process ends by the marker in its environment (:func:`orphans.strays`).
One that also cleared its environment is found as a child: the spawner is a child
subreaper (``PR_SET_CHILD_SUBREAPER``, set when the table starts), so every
orphaned descendant of its processes is reparented to the spawner, not to init.
Off the spawn path -- when processes finish, and every :data:`ADOPT_S` -- the
sweep lists the spawner's direct children (``/proc/self/task/*/children``) that
are neither processes of a table nor warm-pool workers: adopted orphans.  One whose
environment names a process that still runs (``FABRIC_SPAWNER`` and
``FABRIC_PROC_ID`` of a live entry) is left alone until that process ends; every
other one gets SIGKILL (with its group, when it leads one) and is reaped with
``waitpid`` on its own pid -- never ``waitpid(-1)``, which would steal the exits the
pidfds report -- as are adopted zombies.  A spawner embedded in another program
(the tests run it inside pytest) leaves the children in its host's own process
group alone (it cannot tell them from the host's own, and no spawned process
starts in that group), and those marked by a spawner not of this process
(:attr:`ProcessTable.any_group` is set by ``python -m services.spawner``, where
every other child descends from the spawner's processes).

Output.  Each chunk goes into a bounded tail and onto the process's subject
``fabric.proc.<node>.out.<local>`` (and ``stream_to``, when the spawn named one),
in order, by one publisher task for the whole table; when more than
:data:`HIGH_WATER` bytes wait to be published the pipes stop being read, so a
chatty process blocks on its pipe instead of filling the spawner's memory.

Peak memory.  ``wait4``'s ``ru_maxrss`` is not the child's alone: at ``execve``
Linux folds the high-water RSS of the mm being left -- the spawner's, shared through
``CLONE_VM`` (a fork's copy would be as large) -- into the child's ``maxrss``.  So
``ru_maxrss`` is the child's own peak only when it is above the spawner's ``VmHWM``
at the exec (the "inherited floor"; a ``VmHWM`` read after the exec is an upper
bound of it, since a high-water mark only grows).  Then, or when the process had a
memory cgroup (its peak counts the tree alone), ``max_rss`` is exact.  Otherwise
the child's peak is below the floor and rusage cannot tell it: ``max_rss`` is the
largest sample taken while it ran (the child's ``VmHWM`` just after exec -- at least
the stack its argv and environment were copied to -- then every :data:`RSS_SAMPLE_S`
and at each status/list look), a lower bound, and ``max_rss_exact`` is false.
Never the spawner's own memory.  (Both reads of the spawner's peak are the kernel's
per-CPU RSS counters, which may drift apart by :data:`FLOOR_SLACK`: a peak counts as
above the floor only beyond that margin.)
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import os
import secrets
import shutil
import signal
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psutil

from fabric import subjects
from fabric.errors import (
    BadRequest,
    Conflict,
    ExecutableNotFound,
    FabricError,
    InternalError,
    NotEnforceable,
    PermissionDenied,
    Unavailable,
    UnknownProcess,
)
from fabric.schema import JSON, ExitInfo, ProcStatus, SpawnRequest
from fabric_ext import spawn as cspawn

from .cgroups import CgroupRoot, ProcCgroup
from .limits import Plan
from .orphans import (
    MARKER_ENV,
    adopted,
    become_subreaper,
    children,
    release_subreaper,
    strays,
)

__all__ = ["ManagedProcess", "ProcessTable", "parse_signal", "PROC_ENV"]

#: the variable that tells a process its fabric id
PROC_ENV = "FABRIC_PROC_ID"
READ_SIZE = 65536
#: after the leader's exit, how long the pipes may stay open (a descendant that left the group)
PIPE_DRAIN_S = 1.0
#: bytes waiting to be published above which the pipes are no longer read, and below which they are again
HIGH_WATER = 8 << 20
LOW_WATER = 1 << 20
#: finished processes kept for wait/info
KEEP_FINISHED = 4096
#: seconds after processes finish before the scan for descendants that escaped their group
SWEEP_S = 0.5
#: seconds between looks for adopted orphans (the spawner is a child subreaper) when nothing finishes
ADOPT_S = 1.0
#: SIGTERM grace before SIGKILL when the spawner stops
STOP_GRACE_S = 1.0
#: seconds between samples of the live processes' peak RSS (``VmHWM``)
RSS_SAMPLE_S = 1.0
#: how far two reads of one mm's RSS may drift apart by the kernel's per-CPU counters
#: alone (file, anon, shmem; each CPU holds back up to a batch of max(32, 2*CPUs) pages,
#: at the exec's read and at ours): rusage counts as the child's own only above this margin
FLOOR_SLACK = 2 * 3 * (os.cpu_count() or 1) * max(32, 2 * (os.cpu_count() or 1)) * os.sysconf("SC_PAGE_SIZE")

STREAM_HEADER = "Fabric-Stream"
PROC_HEADER = "Fabric-Proc"
SEQ_HEADER = "Fabric-Seq"

Publish = Callable[[str, bytes, dict[str, str]], Awaitable[None]]


def _proc_kb(path: str, key: bytes) -> int:
    """The ``key: N kB`` line of a /proc file, in bytes; 0 when absent or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        data = os.read(fd, 8192)
    except OSError:
        return 0
    finally:
        os.close(fd)
    i = data.find(key)
    if i < 0:
        return 0
    try:
        return int(data[i + len(key):data.index(b"kB", i)]) * 1024
    except ValueError:
        return 0


def vm_hwm(pid: int | str) -> int:
    """``VmHWM`` of *pid* (or ``"self"``) in bytes: the peak RSS of its current mm; 0 when gone (or a zombie).

    The kernel's RSS counters are per-CPU and read approximately: a tiny process may read 0.
    """
    return _proc_kb(f"/proc/{pid}/status", b"VmHWM:")


def exec_stack_bytes(argv: list[str], env_bytes: int, env_count: int) -> int:
    """Bytes of resident stack every exec'd process has had: argv and envp copied there, page-rounded.

    A lower bound of any process's peak RSS that needs no sample (it may end before one).
    """
    n = sum(len(a) + 1 for a in argv) + env_bytes + 8 * (len(argv) + env_count + 2)
    return (n + 4095) // 4096 * 4096


def parse_signal(value: int | str) -> int:
    """``9``, ``"9"``, ``"KILL"``, ``"SIGKILL"`` -> 9; BadRequest otherwise."""
    if isinstance(value, bool):
        raise BadRequest("signal must be a number or a name like 'SIGTERM'")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        num = int(value)
        if num in {s.value for s in signal.Signals}:
            return num
        raise BadRequest(f"unknown signal number {num}")
    name = value.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise BadRequest(f"unknown signal {value!r}") from None


class OutputTail:
    """The last *limit* bytes of one stream, and how many there were in all."""

    __slots__ = ("buf", "limit", "total")

    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if self.limit == 0:
            return
        self.buf += data
        extra = len(self.buf) - self.limit
        if extra > 0:
            del self.buf[:extra]


#: every started table of this process: none of their processes is ever an adopted orphan
_TABLES: weakref.WeakSet[ProcessTable] = weakref.WeakSet()


@dataclass(eq=False)
class ManagedProcess:
    """One running (or recently finished) process and everything needed to end it whole."""

    id: str
    local: str
    pid: int
    argv: list[str]
    owner: str
    subject: str
    stream_to: str | None
    announce: bool
    plan: Plan
    started_at: float
    t0: float
    stdout: OutputTail
    stderr: OutputTail
    cgroup: ProcCgroup | None = None
    pidfd: int = -1
    out_fd: int = -1
    err_fd: int = -1
    stdin_fd: int = -1
    stdin_pending: bytearray = field(default_factory=bytearray)
    stdin_eof: bool = False
    kill_reason: str | None = None
    exit: ExitInfo | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: futures of wait requests, resolved by the exit before anything else runs
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    seq: int = 0
    reaped: bool = False
    wall_timer: asyncio.TimerHandle | None = None
    drain_timer: asyncio.TimerHandle | None = None
    status_raw: int = 0
    rusage: Any = None
    #: the largest peak RSS sampled while it ran (bytes; a lower bound of the true peak)
    rss_sample: int = 0
    #: psutil handles of the group's members, by pid, so cpu_percent measures between looks
    members: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.exit is None


class ProcessTable:
    """Every process of one spawner: spawn, signal, stdin, list, wait, stop all."""

    def __init__(self, node: str, publish: Publish, *, marker: str, cgroups: CgroupRoot | None) -> None:
        self.node = node
        self.publish = publish
        self.marker = marker
        self.cgroups = cgroups
        self.live: dict[str, ManagedProcess] = {}
        self.finished: collections.OrderedDict[str, ManagedProcess] = collections.OrderedDict()
        # a fresh prefix per spawner incarnation: ids stay unique across restarts
        self._prefix = secrets.token_hex(3)
        self._counter = itertools.count(1)
        self.spawned = 0
        self._queue: collections.deque[tuple[ManagedProcess, str, bytes]] = collections.deque()
        self._queued_bytes = 0
        self._paused = False
        self._wakeup = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: ids finished since the last stray sweep
        self._to_sweep: set[str] = set()
        self._sweep_due = asyncio.Event()
        #: the most tail bytes per stream one message may carry (base64 in JSON: 4/3, two
        #: streams, room for the rest); the service sets it from the server's max payload
        self.max_tail_in_message = (1 << 20) // 3
        #: called with the pids a stray sweep killed (the service logs them)
        self.on_strays: Callable[[list[int]], None] | None = None
        #: the pids of the other children this process started and still has to reap
        #: itself (the warm-pool workers): never adopted orphans
        self.own_children: Callable[[], set[int]] | None = None
        #: every child that is not ours is an adopted orphan, even in our own process
        #: group (the spawner is its own process); false when embedded in another program
        self.any_group = False
        self._subreaper = False
        #: PATH lookups by (name, PATH); a stale entry fails at exec as ENOENT and is dropped
        self._which: dict[tuple[str, str], str] = {}
        self._base_env = dict(os.environ)
        self._base_env.pop(MARKER_ENV, None)
        self._base_env.pop(PROC_ENV, None)
        self._base_env_list = [os.fsencode(f"{k}={v}") for k, v in self._base_env.items()]
        self._marker_entry = f"{MARKER_ENV}={marker}".encode()
        #: the spawner's own VmHWM (bytes) and when it was read (monotonic): the inherited floor
        self._floor = 0
        self._floor_at = 0.0
        self._sampler: asyncio.Task[None] | None = None

    # -- lookup ---------------------------------------------------------------------

    def get(self, proc_id: str) -> ManagedProcess:
        node, _, local = proc_id.partition(":")
        if node != self.node:
            raise UnknownProcess(f"process {proc_id} does not belong to node {self.node}", id=proc_id)
        mp = self.live.get(local) or self.finished.get(local)
        if mp is None:
            raise UnknownProcess(f"no process {proc_id} on node {self.node} (never spawned here, or forgotten)",
                                 id=proc_id)
        return mp

    # -- spawning --------------------------------------------------------------------

    def _environment(self, req: SpawnRequest, proc_id: str) -> list[bytes]:
        """The child's environment as ``KEY=VALUE`` strings (the spawner's own, encoded once, unless replaced)."""
        extra = [f"{PROC_ENV}={proc_id}".encode(), self._marker_entry]
        if not req.env:
            return ([] if req.clear_env else self._base_env_list) + extra
        env = {} if req.clear_env else dict(self._base_env)
        for key, value in req.env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise BadRequest(f"invalid environment variable {key!r}: names are non-empty, without '=' "
                                 "or NUL, and values have no NUL")
            env[key] = value
        env.pop(PROC_ENV, None)
        env.pop(MARKER_ENV, None)
        return [os.fsencode(f"{k}={v}") for k, v in env.items()] + extra

    def _path_of(self, req: SpawnRequest) -> str:
        """The PATH argv[0] is looked up on: the request's, else the spawner's (none with clear_env)."""
        if req.env and "PATH" in req.env:
            return req.env["PATH"]
        return os.defpath if req.clear_env else self._base_env.get("PATH", os.defpath)

    def _executable(self, argv0: str, search: str, cwd: str | None) -> str:
        """argv[0] as a path: kept when it names one (exec reports ENOENT/EACCES), else looked up on PATH."""
        if "\0" in argv0:
            raise BadRequest("argv strings must not contain NUL bytes")
        if "/" in argv0:
            return argv0 if os.path.isabs(argv0) or cwd is None else os.path.join(cwd, argv0)
        key = (argv0, search)
        found = self._which.get(key)
        if found is None:
            found = shutil.which(argv0, path=search)
            if found is None:
                raise ExecutableNotFound(f"executable {argv0!r} not found on the node's PATH", argv0=argv0)
            if len(self._which) > 4096:
                self._which.clear()
            self._which[key] = found
        return found

    def spawn(self, req: SpawnRequest, plan: Plan, executable: str | None = None) -> ManagedProcess:
        """Start *req* under *plan*; *executable* overrides the lookup of argv[0] (native blobs)."""
        if req.cwd is not None and not os.path.isdir(req.cwd):
            raise BadRequest(f"cwd {req.cwd!r} is not a directory on node {self.node}")
        local = f"{self._prefix}-{next(self._counter)}"
        proc_id = f"{self.node}:{local}"
        env = self._environment(req, proc_id)
        exe = executable or self._executable(req.argv[0], self._path_of(req), req.cwd)
        want_stdin = req.stdin is not None or req.stdin_open
        in_r = in_w = out_r = out_w = err_r = err_w = cgroup_fd = pidfd = -1
        cgroup: ProcCgroup | None = None
        try:
            if want_stdin:
                in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            if plan.mem_bytes is not None:
                assert self.cgroups is not None
                try:
                    cgroup = self.cgroups.create(local, plan.mem_bytes)
                    cgroup_fd = os.open(cgroup.procs_file, os.O_WRONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise NotEnforceable(f"limits.mem_bytes: cannot create the cgroup: {exc}") from None
            pid, pidfd = cspawn.spawn(
                exe, req.argv, env, stdin=in_r, stdout=out_w, stderr=err_w, cwd=req.cwd, process_group=0,
                cgroup_fd=cgroup_fd, unshare_flags=plan.netns_flags, rlimits=plan.rlimits, uid=plan.uid,
                gid=plan.gid, no_new_privs=plan.no_new_privs,
                # the spawner dying takes a limited process with it (its group is killed on a
                # clean stop; this covers kill -9 of the spawner)
                pdeathsig=signal.SIGKILL if plan.needs_child else 0)
            exec_hwm = vm_hwm(pid)
        except BaseException as exc:
            if isinstance(exc, FileNotFoundError):
                self._which.pop((req.argv[0], self._path_of(req)), None)
            self._close_fds(in_w, out_r, err_r)
            if cgroup is not None:
                cgroup.remove()
            raise self._spawn_error(req, exc) from None
        finally:
            self._close_fds(in_r, out_w, err_w, cgroup_fd)
        mp = ManagedProcess(
            id=proc_id, local=local, pid=pid, argv=list(req.argv), owner=req.owner,
            subject=subjects.node_scoped("proc", self.node, f"out.{local}"), stream_to=req.stream_to,
            announce=req.announce,
            plan=plan, started_at=time.time(), t0=time.monotonic(),
            stdout=OutputTail(req.tail_bytes), stderr=OutputTail(req.tail_bytes), cgroup=cgroup, pidfd=pidfd,
        )
        try:
            self._watch(mp, out_r, err_r, in_w)
        except OSError as exc:  # no pidfd: it cannot be watched, so it must not run
            self._abandon(mp, out_r, err_r, in_w)
            raise self._spawn_error(req, exc) from None
        # a first lower bound of its peak, for a process that ends before any other sample:
        # its VmHWM now (its own mm: the spawn returns after the exec closed the error pipe;
        # 0 if it ended already, or read approximately), at least its exec's argv+envp stack
        mp.rss_sample = max(exec_hwm, exec_stack_bytes(req.argv, sum(map(len, env)) + len(env), len(env)))
        self.spawned += 1
        self.live[local] = mp
        if req.stdin:
            self.write_stdin(mp, req.stdin, eof=not req.stdin_open)
        elif req.stdin is not None and not req.stdin_open:
            self._close_stdin(mp)
        return mp

    def _abandon(self, mp: ManagedProcess, *fds: int) -> None:
        """Kill and reap a process that was started but cannot be watched."""
        loop = asyncio.get_running_loop()
        for fd in (mp.pidfd, *fds):
            if fd >= 0:
                loop.remove_reader(fd)
        try:
            os.killpg(mp.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.wait4(mp.pid, 0)
        except ChildProcessError:
            pass
        if mp.wall_timer is not None:
            mp.wall_timer.cancel()
        self._close_fds(mp.pidfd, *fds)
        if mp.cgroup is not None:
            mp.cgroup.remove()

    @staticmethod
    def _spawn_error(req: SpawnRequest, exc: BaseException) -> BaseException:
        if isinstance(exc, (FabricError, KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
            return exc
        if isinstance(exc, ValueError) and "null" in str(exc):
            return BadRequest("argv and env strings must not contain NUL bytes")
        if isinstance(exc, cspawn.ChildSetupError):
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                return Unavailable(f"node out of resources to start a process ({exc}): retry later")
            if exc.step == "chdir":
                return BadRequest(f"cannot change to cwd {req.cwd!r}: {exc.strerror}")
            return NotEnforceable(f"applying the limits and sandbox in the child failed: {exc}")
        if isinstance(exc, FileNotFoundError):
            return ExecutableNotFound(f"cannot execute {req.argv[0]!r}: {exc.strerror}", argv0=req.argv[0])
        if isinstance(exc, PermissionError):
            return PermissionDenied(f"cannot execute {req.argv[0]!r}: {exc.strerror}")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
            return Unavailable(f"node out of resources to start a process ({exc.strerror}): retry later")
        if isinstance(exc, OSError) and exc.errno == errno.ENOEXEC:
            return BadRequest(f"cannot execute {req.argv[0]!r}: not an executable format")
        return InternalError(f"spawn failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _close_fds(*fds: int) -> None:
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _watch(self, mp: ManagedProcess, out_r: int, err_r: int, in_w: int) -> None:
        loop = asyncio.get_running_loop()
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        mp.out_fd, mp.err_fd = out_r, err_r
        if in_w >= 0:
            os.set_blocking(in_w, False)
            mp.stdin_fd = in_w
        loop.add_reader(mp.pidfd, self._on_exit, mp)
        if not self._paused:
            loop.add_reader(out_r, self._on_output, mp, out_r, "stdout")
            loop.add_reader(err_r, self._on_output, mp, err_r, "stderr")
        if mp.plan.wall_s is not None:
            mp.wall_timer = loop.call_later(mp.plan.wall_s, self._on_wall_timeout, mp)

    # -- output ---------------------------------------------------------------------

    def _on_output(self, mp: ManagedProcess, fd: int, stream: str) -> None:
        tail = mp.stdout if stream == "stdout" else mp.stderr
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_stream(mp, stream)
            return
        tail.add(data)
        self._enqueue(mp, stream, data)

    def _close_stream(self, mp: ManagedProcess, stream: str) -> None:
        fd = mp.out_fd if stream == "stdout" else mp.err_fd
        if fd < 0:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        os.close(fd)
        if stream == "stdout":
            mp.out_fd = -1
        else:
            mp.err_fd = -1
        if mp.reaped and mp.out_fd < 0 and mp.err_fd < 0:
            self._finish(mp)

    def _enqueue(self, mp: ManagedProcess, stream: str, data: bytes) -> None:
        if not mp.announce and not mp.stream_to:
            return  # nobody is to get it: the tail has it
        self._queue.append((mp, stream, data))
        self._queued_bytes += len(data)
        if not self._wakeup.is_set():
            self._wakeup.set()
        if self._queued_bytes > HIGH_WATER and not self._paused:
            self._set_paused(True)

    def _set_paused(self, paused: bool) -> None:
        loop = asyncio.get_running_loop()
        self._paused = paused
        for mp in self.live.values():
            for fd, stream in ((mp.out_fd, "stdout"), (mp.err_fd, "stderr")):
                if fd >= 0:
                    if paused:
                        loop.remove_reader(fd)
                    else:
                        loop.add_reader(fd, self._on_output, mp, fd, stream)

    def start(self) -> None:
        # orphaned descendants of our processes come to us, not to init (see the module docstring)
        self._subreaper = become_subreaper()
        _TABLES.add(self)
        self._publisher = asyncio.create_task(self._publish_loop())
        self._sweeper = asyncio.create_task(self._sweep_loop())
        self._sampler = asyncio.create_task(self._sample_loop())

    async def _sample_loop(self) -> None:
        """Every :data:`RSS_SAMPLE_S`: each live leader's VmHWM (its pid is ours until we reap it)."""
        while True:
            await asyncio.sleep(RSS_SAMPLE_S)
            for mp in list(self.live.values()):
                if not mp.reaped:
                    mp.rss_sample = max(mp.rss_sample, vm_hwm(mp.pid))

    async def _sweep_loop(self) -> None:
        """:data:`SWEEP_S` after processes finish, else every :data:`ADOPT_S`: kill what escaped."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._sweep_due.wait(), ADOPT_S)
            except asyncio.TimeoutError:
                pass
            else:
                await asyncio.sleep(SWEEP_S)  # batches the exits of a busy moment into one scan
            self._sweep_due.clear()
            ids, self._to_sweep = self._to_sweep, set()
            killed: list[int] = []
            if ids:
                try:
                    killed = await loop.run_in_executor(None, strays, self.marker, ids, PROC_ENV)
                except Exception:  # /proc unreadable: nothing more this sweep can do
                    pass
            if self._subreaper:
                # who is ours is decided here, on the loop, where spawns happen: a process
                # started a moment later is never taken for an orphan
                candidates, owners, markers = self._adoption_snapshot()
                if candidates:
                    try:
                        gone, _ = await loop.run_in_executor(None, adopted, candidates, owners, markers,
                                                             PROC_ENV, self.any_group)
                        killed += [pid for pid in gone if pid not in killed]
                    except Exception:
                        pass
            if killed and self.on_strays is not None:
                self.on_strays(killed)

    def _adoption_snapshot(self) -> tuple[list[int], set[tuple[bytes, bytes]], set[bytes]]:
        """(our children no table nor pool started, (marker, id) of every live process, our markers)."""
        kids = children()
        if not kids:
            return [], set(), set()
        owners: set[tuple[bytes, bytes]] = set()
        markers = {self.marker.encode()}
        for table in list(_TABLES):
            marker = table.marker.encode()
            markers.add(marker)
            for mp in table.live.values():
                if not mp.reaped:
                    kids.discard(mp.pid)
                owners.add((marker, mp.id.encode()))
        for table in list(_TABLES):
            if kids and table.own_children is not None:
                kids -= table.own_children()
        return sorted(kids), owners, markers

    async def _publish_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._drain_queue()

    async def _drain_queue(self) -> None:
        queue = self._queue
        while queue:
            mp, stream, data = queue.popleft()
            self._queued_bytes -= len(data) if stream != "exit" else 0
            mp.seq += 1
            headers = {PROC_HEADER: mp.id, STREAM_HEADER: stream, SEQ_HEADER: str(mp.seq)}
            try:
                if mp.announce:
                    await self.publish(mp.subject, data, headers)
                if mp.stream_to:
                    await self.publish(mp.stream_to, data, headers)
            except Exception:  # connection trouble: the tails still hold the output
                pass
            if self._paused and self._queued_bytes < LOW_WATER:
                self._set_paused(False)

    # -- stdin ----------------------------------------------------------------------

    def write_stdin(self, mp: ManagedProcess, data: bytes, *, eof: bool = False) -> int:
        if mp.stdin_fd < 0 or mp.stdin_eof:
            raise Conflict(f"process {mp.id} has no open stdin (spawn it with stdin_open=true)"
                           if mp.running else f"process {mp.id} has ended")
        mp.stdin_pending += data
        mp.stdin_eof = eof
        self._flush_stdin(mp)
        return len(data)

    def _flush_stdin(self, mp: ManagedProcess) -> None:
        loop = asyncio.get_running_loop()
        while mp.stdin_pending:
            try:
                n = os.write(mp.stdin_fd, mp.stdin_pending)
            except BlockingIOError:
                loop.add_writer(mp.stdin_fd, self._on_stdin_writable, mp)
                return
            except (BrokenPipeError, OSError):  # the process closed its stdin or ended
                mp.stdin_pending.clear()
                break
            del mp.stdin_pending[:n]
        loop.remove_writer(mp.stdin_fd)
        if mp.stdin_eof:
            self._close_stdin(mp)

    def _on_stdin_writable(self, mp: ManagedProcess) -> None:
        if mp.stdin_fd >= 0:
            self._flush_stdin(mp)

    def _close_stdin(self, mp: ManagedProcess) -> None:
        if mp.stdin_fd >= 0:
            asyncio.get_running_loop().remove_writer(mp.stdin_fd)
            os.close(mp.stdin_fd)
            mp.stdin_fd = -1
        mp.stdin_eof = True

    # -- ending ---------------------------------------------------------------------

    def signal(self, mp: ManagedProcess, sig: int, reason: str | None = "killed") -> bool:
        """Send *sig* to the process's whole group (and strays); False if it already ended."""
        if not mp.running or mp.reaped:
            return False
        if reason is not None and mp.kill_reason is None:
            mp.kill_reason = reason
        strays: list[int] = []
        try:
            # descendants that moved to another group or session still belong to the process
            strays = [c.pid for c in psutil.Process(mp.pid).children(recursive=True)]
        except psutil.Error:
            pass
        try:
            os.killpg(mp.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in strays:
            try:
                if os.getpgid(pid) != mp.pid:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGKILL and mp.cgroup is not None:
            mp.cgroup.kill_all()
        return True

    def _on_wall_timeout(self, mp: ManagedProcess) -> None:
        mp.wall_timer = None
        self.signal(mp, signal.SIGKILL, "timeout")

    def _on_exit(self, mp: ManagedProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(mp.pidfd)
        # The leader is a zombie now, not yet reaped: its pid -- the group id -- cannot
        # be reused, so killing the group reaches exactly what is left of the process.
        try:
            os.killpg(mp.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if mp.cgroup is not None:
            mp.cgroup.kill_all()
        try:
            _, status, rusage = os.wait4(mp.pid, 0)
        except ChildProcessError:  # reaped by someone else: report what we can
            status, rusage = 0, None
        os.close(mp.pidfd)
        mp.pidfd = -1
        mp.reaped = True
        mp.status_raw, mp.rusage = status, rusage
        if mp.wall_timer is not None:
            mp.wall_timer.cancel()
            mp.wall_timer = None
        if mp.stdin_fd >= 0:
            self._close_stdin(mp)
        if mp.out_fd < 0 and mp.err_fd < 0:
            self._finish(mp)
        else:
            # a descendant outside the group may hold the pipes: read what is there, then stop
            mp.drain_timer = loop.call_later(PIPE_DRAIN_S, self._give_up_pipes, mp)

    def _give_up_pipes(self, mp: ManagedProcess) -> None:
        mp.drain_timer = None
        for stream in ("stdout", "stderr"):
            self._close_stream(mp, stream)
        if mp.exit is None:
            self._finish(mp)

    def _finish(self, mp: ManagedProcess) -> None:
        if mp.exit is not None:
            return
        if mp.drain_timer is not None:
            mp.drain_timer.cancel()
            mp.drain_timer = None
        code = os.waitstatus_to_exitcode(mp.status_raw)
        exit_code, sig = (code, None) if code >= 0 else (None, -code)
        ru = mp.rusage
        cpu_s = (ru.ru_utime + ru.ru_stime) if ru is not None else 0.0
        max_rss, max_rss_exact = self._peak_rss(mp)
        if sig is None:
            reason = "exited"
        elif mp.kill_reason is not None:
            reason = mp.kill_reason
        elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and mp.plan.cpu_s is not None
                                       and cpu_s >= mp.plan.cpu_s * 0.8):  # rusage lags the rlimit's clock
            reason = "cpu_limit"
        elif mp.cgroup is not None and mp.cgroup.oom_killed():
            reason = "memory_limit"
        else:
            reason = "signaled"
        if mp.cgroup is not None:
            mp.cgroup.remove()
        mp.exit = ExitInfo(
            id=mp.id, exit_code=exit_code, signal=sig, reason=reason, cpu_s=round(cpu_s, 6), max_rss=max_rss,
            max_rss_exact=max_rss_exact,
            duration_s=round(time.monotonic() - mp.t0, 6), stdout=bytes(mp.stdout.buf), stderr=bytes(mp.stderr.buf),
            stdout_total=mp.stdout.total, stderr_total=mp.stderr.total,
        )
        mp.members.clear()
        self.live.pop(mp.local, None)
        self.finished[mp.local] = mp
        while len(self.finished) > KEEP_FINISHED:
            self.finished.popitem(last=False)
        if mp.announce or mp.stream_to:
            self._queue.append((mp, "exit", JSON.encode(self.fit(mp.exit))))
        # waiters first (a one-round-trip spawn's reply is on the critical path), the
        # stream's exit message right after: it joins the reply in the same socket write
        for fut in mp.waiters:
            if not fut.done():
                fut.set_result(None)
        mp.waiters.clear()
        mp.done.set()
        if self._queue:  # nothing to publish (a one-round-trip run): no publisher step
            asyncio.get_running_loop().call_soon(self._wakeup.set)
        self._to_sweep.add(mp.id)
        self._sweep_due.set()

    def _peak_rss(self, mp: ManagedProcess) -> tuple[int, bool]:
        """(max_rss, exact) of a reaped process: never the spawner's memory (see the module docstring)."""
        exact = 0
        ru = mp.rusage
        ru_rss = ru.ru_maxrss * 1024 if ru is not None else 0
        if ru_rss > self._floor + FLOOR_SLACK and self._floor_at < mp.t0:
            # the cached floor may predate the exec (the spawner grew since): read it again
            self._floor, self._floor_at = vm_hwm("self"), time.monotonic()
        # above the inherited floor: the child's own (or its largest reaped child's)
        if ru_rss > self._floor + FLOOR_SLACK:
            exact = ru_rss
        if mp.cgroup is not None:  # the tree's own charge, exact whatever the floor
            exact = max(exact, mp.cgroup.peak())
        if exact >= mp.rss_sample and exact > 0:
            return exact, True
        return mp.rss_sample, False

    def fit(self, ex: ExitInfo | None) -> ExitInfo | None:
        """*ex* with its tails cut (keeping their ends) to what one message can carry."""
        limit = self.max_tail_in_message
        if ex is None or (len(ex.stdout) <= limit and len(ex.stderr) <= limit):
            return ex
        return msgspec.structs.replace(ex, stdout=ex.stdout[-limit:] if limit else b"",
                                       stderr=ex.stderr[-limit:] if limit else b"")

    async def wait(self, mp: ManagedProcess, timeout: float) -> ExitInfo | None:
        """The exit, waiting up to *timeout* seconds for it (None if still running then)."""
        if mp.exit is None and timeout > 0:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            mp.waiters.append(fut)
            # a timer and a future, not wait_for(): no extra task on the spawn-and-wait path
            timer = loop.call_later(timeout, _resolve, fut)
            try:
                await fut
            finally:
                timer.cancel()
                if fut in mp.waiters:
                    mp.waiters.remove(fut)
        return mp.exit

    # -- looking --------------------------------------------------------------------

    def status(self, mp: ManagedProcess, *, tails: bool = True) -> ProcStatus:
        """State, live CPU/RSS of the group; the exit with its tails (cut to fit), or without (lists)."""
        ex = self.fit(mp.exit) if tails else (
            msgspec.structs.replace(mp.exit, stdout=b"", stderr=b"") if mp.exit is not None else None)
        st = ProcStatus(id=mp.id, node=self.node, pid=mp.pid, argv=mp.argv, owner=mp.owner,
                        state="running" if mp.running else "exited", started_at=mp.started_at,
                        enforced=list(mp.plan.enforced), exit=ex)
        if not mp.running:
            return st
        try:
            leader = mp.members.get(mp.pid) or psutil.Process(mp.pid)
            procs = [leader] + leader.children(recursive=True)
        except psutil.Error:
            return st
        cpu, rss, seen = 0.0, 0, {}
        peak = vm_hwm(mp.pid) if not mp.reaped else 0  # the leader's pid is ours until reaped
        for p in procs:
            p = mp.members.get(p.pid, p)
            try:
                with p.oneshot():
                    cpu += p.cpu_percent(None)
                    member_rss = p.memory_info().rss
                    rss += member_rss
                    peak = max(peak, member_rss)  # a descendant's current RSS: a lower bound of its peak
                    if p.pid == mp.pid:
                        st.status = p.status()
            except psutil.Error:
                continue
            seen[p.pid] = p
        mp.members = seen
        mp.rss_sample = max(mp.rss_sample, peak)
        st.cpu_percent, st.rss, st.members = round(cpu, 1), rss, len(seen)
        return st

    # -- stopping -------------------------------------------------------------------

    async def stop(self) -> None:
        """The spawner stops: SIGTERM every group, SIGKILL what is left, publish every exit."""
        live = list(self.live.values())
        for mp in live:
            self.signal(mp, signal.SIGTERM, "spawner_stopped")
        if live:
            await asyncio.wait([asyncio.ensure_future(mp.done.wait()) for mp in live], timeout=STOP_GRACE_S)
        for mp in list(self.live.values()):
            self.signal(mp, signal.SIGKILL, "spawner_stopped")
        if self.live:
            await asyncio.wait([asyncio.ensure_future(mp.done.wait()) for mp in self.live.values()],
                               timeout=PIPE_DRAIN_S + 1.0)
        await self._drain_queue()
        if self._publisher is not None:
            self._publisher.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._sampler is not None:
            self._sampler.cancel()
        ids = self._to_sweep | {mp.id for mp in self.finished.values()}
        if ids:  # the last chance: nothing may outlive the spawner
            strays(self.marker, ids, PROC_ENV)
        _TABLES.discard(self)
        if self._subreaper:
            candidates, owners, markers = self._adoption_snapshot()
            if candidates:
                adopted(candidates, owners, markers, PROC_ENV, self.any_group, patience=1.0)
            release_subreaper()
            self._subreaper = False
        if self.cgroups is not None:
            self.cgroups.close()


def _resolve(fut: asyncio.Future[None]) -> None:
    """Wake a waiter (a timer's callback): a no-op once something else resolved it."""
    if not fut.done():
        fut.set_result(None)
