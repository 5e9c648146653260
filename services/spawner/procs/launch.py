"""Starting a process fast: its environment, its executable, and the one C call that starts it.

Every process starts through :func:`fabric_ext.spawn.spawn`: clone with
``CLONE_VM|CLONE_VFORK`` and exec in C, no Python in the child.  Between the two the
child makes system calls only: its own process group, default signal dispositions,
stdio, close-on-exec for every other descriptor (the spawner's NATS socket, rings and
pidfds never cross exec), and what the :class:`~..limits.Plan` asks for -- cgroup,
network namespace, rlimits, user switch, parent-death signal, no_new_privs.  A step
that fails comes back with its errno before the spawn returns, so what the reply calls
enforced was applied, and a process with limits starts as fast as one without.  The
clone hands back a pidfd (``CLONE_PIDFD``), which the table watches.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass

from fabric.errors import (
    BadRequest,
    ExecutableNotFound,
    FabricError,
    InternalError,
    NotEnforceable,
    PermissionDenied,
    Unavailable,
)
from fabric.protocol import subjects
from fabric.schema import SpawnRequest
from fabric_ext import spawn as cspawn

from ..cgroups import CgroupRoot, ProcCgroup
from ..limits import Plan
from ..orphans import MARKER_ENV
from .model import PROC_ENV, ManagedProcess, OutputTail, close_fds
from .rss import exec_stack_bytes, vm_hwm

__all__ = ["Launcher", "Started", "abandon", "spawn_error"]


@dataclass
class Started:
    """A process just started, before anything watches it: its record and the parent's pipe ends."""

    mp: ManagedProcess
    out_r: int
    err_r: int
    #: -1 without a stdin pipe
    in_w: int


class Launcher:
    """Starts the processes of one table: ids, environments, PATH lookups, pipes, cgroups."""

    def __init__(self, node: str, marker: str, cgroups: CgroupRoot | None) -> None:
        self.node = node
        self.cgroups = cgroups
        # a fresh prefix per spawner incarnation: ids stay unique across restarts
        self._prefix = secrets.token_hex(3)
        self._counter = itertools.count(1)
        #: PATH lookups by (name, PATH); a stale entry fails at exec as ENOENT and is dropped
        self._which: dict[tuple[str, str], str] = {}
        self._base_env = dict(os.environ)
        self._base_env.pop(MARKER_ENV, None)
        self._base_env.pop(PROC_ENV, None)
        self._base_env_list = [os.fsencode(f"{k}={v}") for k, v in self._base_env.items()]
        self._marker_entry = f"{MARKER_ENV}={marker}".encode()

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

    def start(self, req: SpawnRequest, plan: Plan, executable: str | None = None) -> Started:
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
            close_fds(in_w, out_r, err_r)
            if cgroup is not None:
                cgroup.remove()
            raise spawn_error(req, exc) from None
        finally:
            close_fds(in_r, out_w, err_w, cgroup_fd)
        mp = ManagedProcess(
            id=proc_id, local=local, pid=pid, argv=list(req.argv), owner=req.owner,
            subject=subjects.node_scoped(subjects.PROC, self.node, f"{subjects.Proc.OUT}.{local}"),
            stream_to=req.stream_to,
            announce=req.announce,
            plan=plan, started_at=time.time(), t0=time.monotonic(),
            stdout=OutputTail(req.tail_bytes), stderr=OutputTail(req.tail_bytes), cgroup=cgroup, pidfd=pidfd,
        )
        # a first lower bound of its peak, for a process that ends before any other sample:
        # its VmHWM now (its own mm: the spawn returns after the exec closed the error pipe;
        # 0 if it ended already, or read approximately), at least its exec's argv+envp stack
        mp.rss_sample = max(exec_hwm, exec_stack_bytes(req.argv, sum(map(len, env)) + len(env), len(env)))
        return Started(mp, out_r, err_r, in_w)


def abandon(mp: ManagedProcess, *fds: int) -> None:
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
    close_fds(mp.pidfd, *fds)
    if mp.cgroup is not None:
        mp.cgroup.remove()


def spawn_error(req: SpawnRequest, exc: BaseException) -> BaseException:
    """The fabric error a failed start answers with."""
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
