"""A process's pipes: stdout and stderr into tails and onto NATS with backpressure, and its stdin.

Each chunk goes into a bounded tail and onto the process's subject
``fabric.proc.<node>.out.<local>`` (and ``stream_to``, when the spawn named one), in
order, by one publisher task for the whole table; when more than :data:`HIGH_WATER`
bytes wait to be published the pipes stop being read (until the queue is below
:data:`LOW_WATER`), so a chatty process blocks on its pipe instead of filling the
spawner's memory.  Every pipe is non-blocking and read with ``loop.add_reader``.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable

from fabric.errors import Conflict
from fabric.protocol.headers import PROC_HEADER, SEQ_HEADER, STREAM_HEADER

from .model import ManagedProcess, Publish

__all__ = ["OutputPump", "HIGH_WATER", "LOW_WATER", "READ_SIZE"]

READ_SIZE = 65536
#: bytes waiting to be published above which the pipes are no longer read, and below which they are again
HIGH_WATER = 8 << 20
LOW_WATER = 1 << 20


class OutputPump:
    """The pipes of every process of one table, and the one task that publishes what they carry."""

    def __init__(self, publish: Publish, live: dict[str, ManagedProcess],
                 on_closed: Callable[[ManagedProcess], None]) -> None:
        self.publish = publish
        #: the table's running processes (their pipes pause and resume together)
        self.live = live
        #: called when both output pipes of a reaped process are closed: it can finish
        self.on_closed = on_closed
        self._queue: collections.deque[tuple[ManagedProcess, str, bytes]] = collections.deque()
        self._queued_bytes = 0
        self._paused = False
        self._wakeup = asyncio.Event()

    # -- the pipes -------------------------------------------------------------------

    @staticmethod
    def attach(mp: ManagedProcess, out_r: int, err_r: int, in_w: int) -> None:
        """Make the pipes non-blocking and hand them to *mp*."""
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        mp.out_fd, mp.err_fd = out_r, err_r
        if in_w >= 0:
            os.set_blocking(in_w, False)
            mp.stdin_fd = in_w

    def read(self, mp: ManagedProcess) -> None:
        """Start reading *mp*'s output (unless the table is paused: resuming will)."""
        if not self._paused:
            loop = asyncio.get_running_loop()
            loop.add_reader(mp.out_fd, self._on_output, mp, mp.out_fd, "stdout")
            loop.add_reader(mp.err_fd, self._on_output, mp, mp.err_fd, "stderr")

    def _on_output(self, mp: ManagedProcess, fd: int, stream: str) -> None:
        tail = mp.stdout if stream == "stdout" else mp.stderr
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close_stream(mp, stream)
            return
        tail.add(data)
        self._enqueue(mp, stream, data)

    def close_stream(self, mp: ManagedProcess, stream: str) -> None:
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
            self.on_closed(mp)

    # -- publishing ----------------------------------------------------------------

    def _enqueue(self, mp: ManagedProcess, stream: str, data: bytes) -> None:
        if not mp.announce and not mp.stream_to:
            return  # nobody is to get it: the tail has it
        self._queue.append((mp, stream, data))
        self._queued_bytes += len(data)
        if not self._wakeup.is_set():
            self._wakeup.set()
        if self._queued_bytes > HIGH_WATER and not self._paused:
            self._set_paused(True)

    def queue_exit(self, mp: ManagedProcess, data: bytes) -> None:
        """The exit message, after the output (the caller wakes the publisher: :meth:`wake_soon`)."""
        self._queue.append((mp, "exit", data))

    def wake_soon(self) -> None:
        """Have the publisher run next loop iteration, if anything waits (a one-round-trip run: nothing)."""
        if self._queue:
            asyncio.get_running_loop().call_soon(self._wakeup.set)

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

    async def publish_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self.drain()

    async def drain(self) -> None:
        """Publish everything queued, in order."""
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
            self.close_stdin(mp)

    def _on_stdin_writable(self, mp: ManagedProcess) -> None:
        if mp.stdin_fd >= 0:
            self._flush_stdin(mp)

    @staticmethod
    def close_stdin(mp: ManagedProcess) -> None:
        if mp.stdin_fd >= 0:
            asyncio.get_running_loop().remove_writer(mp.stdin_fd)
            os.close(mp.stdin_fd)
            mp.stdin_fd = -1
        mp.stdin_eof = True
