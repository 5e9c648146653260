"""What every part of the process table shares: one process's record, its output tails, the settings.

:class:`ManagedProcess` is the record the launcher fills, the output pump and the
reaper update, and the table looks up; :class:`TableSettings` is the table's
configuration, given at construction.  Nothing here imports another part of the
table: the others import this.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from fabric.errors import BadRequest
from fabric.protocol.env import PROC_ENV  # the variable that tells a process its fabric id
from fabric.schema import ExitInfo

from ..cgroups import ProcCgroup
from ..limits import Plan

__all__ = ["ManagedProcess", "OutputTail", "TableSettings", "Publish", "PROC_ENV", "parse_signal", "close_fds"]

#: after the leader's exit, how long the pipes may stay open (a descendant that left the group)
PIPE_DRAIN_S = 1.0

#: ``publish(subject, data, headers)``: how output and exits reach NATS
Publish = Callable[[str, bytes, dict[str, str]], Awaitable[None]]


@dataclass(frozen=True)
class TableSettings:
    """How one process table is configured (given at construction, never changed after)."""

    #: the most tail bytes per stream one message may carry (base64 in JSON: 4/3, two
    #: streams, room for the rest); the service sets it from the server's max payload
    max_tail_in_message: int = (1 << 20) // 3
    #: called with the pids a stray sweep killed (the service logs them)
    on_strays: Callable[[list[int]], None] | None = None
    #: the pids of the other children this process started and still has to reap
    #: itself (the warm-pool workers): never adopted orphans
    own_children: Callable[[], set[int]] | None = None
    #: every child that is not ours is an adopted orphan, even in our own process
    #: group (the spawner is its own process); false when embedded in another program
    any_group: bool = False


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


def close_fds(*fds: int) -> None:
    """Close every descriptor that is not -1, ignoring errors."""
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


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
