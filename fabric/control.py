"""A fabric controlled from outside its supervisor: what ``fabric up -d`` and ``fabric down`` do.

:func:`start_detached` forks the supervisor (:mod:`fabric.supervisor`) into its own
session with its output in ``logs/supervisor.log``, and hands back a
:class:`DetachedSupervisor` whose ready pipe says, in one JSON line, whether the
fabric came up.  :func:`stop_supervisor` asks a running supervisor to stop (the
grace goes through ``stop.json``, then SIGTERM); :func:`kill_leftovers` kills what a
dead supervisor left running; :func:`release_allocator_memory` runs the allocator's
own entry point for ``fabric down --purge``.

The CLI (:mod:`fabric.cli_up`, :mod:`fabric.cli_down`) only presents the outcome;
everything here is mechanics, and imports nothing from the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .state import FabricState, StateDir, pid_alive
from .supervisor import NATS_STOP_TIMEOUT_S, Supervisor, SupervisorConfig, rotate_log

__all__ = ["Report", "DetachedSupervisor", "start_detached", "stop_supervisor", "kill_leftovers",
           "release_allocator_memory", "ALLOCATOR_IDENTITY_MODULE"]

#: the allocator's entry point that releases its shared memory (``python -m ... --release-memory DIR``)
ALLOCATOR_IDENTITY_MODULE = "fabric.services.allocator.identity"


@dataclass(frozen=True)
class Report:
    """The supervisor's one word on the ready pipe."""

    ready: bool
    failing: list[str] = field(default_factory=list)


class DetachedSupervisor:
    """The forked supervisor, seen from ``fabric up -d`` (its parent)."""

    def __init__(self, pid: int, report_fd: int) -> None:
        self.pid = pid
        self._fd = report_fd
        #: set by wait_report when the pipe reached EOF without a report: the supervisor died
        self.hung_up = False

    def wait_report(self, timeout: float) -> Report | None:
        """The supervisor's report, or None if it died without one or said nothing within *timeout*.

        Call it once: the pipe is closed after it.
        """
        buf = b""
        deadline = time.monotonic() + timeout
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                ready, _, _ = select.select([self._fd], [], [], min(left, 0.5))
                if not ready:
                    continue
                chunk = os.read(self._fd, 4096)
                if not chunk:  # EOF: the supervisor died without a word
                    self.hung_up = True
                    return None
                buf += chunk
        finally:
            os.close(self._fd)
        try:
            msg = json.loads(buf.split(b"\n", 1)[0])
        except ValueError:
            return None
        if not isinstance(msg, dict):
            return None
        return Report(ready=bool(msg.get("ready")), failing=list(msg.get("failing") or []))

    def exited(self) -> bool:
        """Whether it has exited (reaping it if it just did)."""
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True
        return done == self.pid

    def terminate(self) -> None:
        """SIGTERM: the supervisor stops what it started."""
        os.kill(self.pid, signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until it exits (at most *timeout* s, None: no limit); whether it did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.exited():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def start_detached(config: SupervisorConfig, lock_fd: int) -> DetachedSupervisor:
    """Fork the supervisor into its own session; the parent gets a handle, the child never returns.

    The child keeps the state directory's lock through its copy of *lock_fd*; the
    parent closes its own.  The child's stdin is /dev/null and its stdout and stderr go
    to ``logs/supervisor.log`` (the previous one rotated): a daemon has no terminal.
    """
    log_path = config.state.log_file("supervisor")
    rotate_log(log_path)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _run_daemon(config, log_path, w)  # never returns
    os.close(w)
    os.close(lock_fd)  # the supervisor holds the lock through its own copy
    return DetachedSupervisor(pid, r)


def _run_daemon(config: SupervisorConfig, log_path: Path, w: int) -> NoReturn:
    """The forked child: become a session leader, run the supervisor, report once on *w*, exit."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a daemon: no terminal to hang up
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)

        def report(msg: dict[str, Any]) -> None:
            nonlocal w
            if w >= 0:
                try:
                    os.write(w, json.dumps(msg).encode() + b"\n")
                    os.close(w)
                except OSError:  # `fabric up` is gone (killed): nobody to tell
                    pass
                w = -1

        sup = Supervisor(
            config,
            on_ready=lambda st: report({"ready": True}),
            on_failed=lambda st, failing: report({"ready": False, "failing": failing}),
        )
        code = asyncio.run(sup.run())
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def stop_supervisor(state: StateDir, running: FabricState, grace: float) -> bool:
    """Ask the supervisor *running* to stop, giving its services *grace* s; SIGKILL it if it takes too long.

    The grace goes through ``stop.json`` before the SIGTERM.  Returns True when it
    stopped by itself, False when it had to be killed.
    """
    pid = running.supervisor_pid
    state.request_stop(grace)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace + NATS_STOP_TIMEOUT_S + 5.0
    while pid_alive(pid, running.supervisor_create_time) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not pid_alive(pid, running.supervisor_create_time):
        return True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return False


def kill_leftovers(st: FabricState, wait: float = 5.0) -> list[str]:
    """SIGKILL every process *st* lists that still runs, wait until they are gone; the names of those killed."""
    killed: dict[str, tuple[int, float]] = {}
    for name, (pid, created) in st.pids().items():
        if pid != os.getpid() and pid_alive(pid, created):
            try:
                os.kill(pid, signal.SIGKILL)
                killed[f"{name} (pid {pid})"] = (pid, created)
            except ProcessLookupError:
                pass
    # they are not our children: watch them go (a zombie counts as gone)
    deadline = time.monotonic() + wait
    while any(pid_alive(*p) for p in killed.values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(killed)


def release_allocator_memory(state: StateDir) -> list[str]:
    """Release the shared memory of every allocator arena in *state* (the allocator must be stopped).

    Runs the allocator's own entry point (fabric imports nothing from the services),
    the way the supervisor starts a service (:func:`fabric.launch.module_launch`).
    Returns the prefixes released; RuntimeError if it fails.
    """
    from .launch import module_launch

    if not (state.path / "allocator").is_dir():
        return []  # no allocator ever ran here: nothing to release
    # the allocator package imports identity before runpy runs it as __main__ (harmless
    # here: the module holds no state); runpy's warning about that would only be noise
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), "ignore::RuntimeWarning:runpy") if w)
    launch = module_launch(ALLOCATOR_IDENTITY_MODULE, ["--release-memory", str(state.path)], cwd=state.path,
                           env=env)
    done = subprocess.run(launch.argv, env=launch.env, cwd=launch.cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{ALLOCATOR_IDENTITY_MODULE} exited {done.returncode}: {done.stderr.strip()}")
    released = json.loads(done.stdout)
    if not isinstance(released, list):
        raise RuntimeError(f"{ALLOCATOR_IDENTITY_MODULE} printed {done.stdout!r}, not a list")
    return [str(p) for p in released]
