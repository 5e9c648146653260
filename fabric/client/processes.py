"""The processes area: rspawn, rrun, rwait, rkill and the rest of docs/protocol.md "Processes".

A spawn subscribes to an inbox first (``stream_to``), so the spawner's output
stream lands in a :class:`_ProcOutput` from its very first byte; the async
:class:`AsyncRemoteProcess` iterates it on the client's loop, the sync
:class:`fabric.client.RemoteProcess` from any thread through its condition.
"""

from __future__ import annotations

import asyncio
import hashlib
import platform
import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from ..errors import BadRequest, ExecutableNotFound, TooLarge, Unavailable
from ..protocol import subjects
from ..protocol.headers import STREAM_HEADER
from ..schema import (
    JSON,
    ExitInfo,
    KillReply,
    KillRequest,
    Limits,
    NativeExec,
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
from ..signing import file_message
from .transport import FRAME_OVERHEAD, Transport

if TYPE_CHECKING:
    from .aio import AsyncFabricClient


class ProcessRef:
    """What both twins of a remote process are: an ``id`` (``<node>:<local>``) a call accepts in its place."""

    id: str


def _proc_id(proc: Any) -> str:
    proc_id = proc.id if isinstance(proc, ProcessRef) else proc
    if not isinstance(proc_id, str) or proc_id.count(":") != 1:
        raise BadRequest(f"not a process id (expected '<node>:<local>'): {proc_id!r}")
    return proc_id


def _proc_node(proc_id: str) -> str:
    return proc_id.partition(":")[0]


def _spawn_request(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                   stdin: bytes | None = None, limits: Limits | None = None, sandbox: Sandbox | None = None,
                   stdin_open: bool = False, strict: bool = True, clear_env: bool = False,
                   tail_bytes: int = 64 << 10, owner: str = "", executable: bytes | None = None,
                   architecture: str | None = None) -> SpawnRequest:
    """Check what a caller passed (typed errors before anything travels) and build the request."""
    if isinstance(argv, (str, bytes)) or not isinstance(argv, (list, tuple)):
        raise BadRequest(f"argv must be a list of strings, got {type(argv).__name__}")
    if not argv:
        raise BadRequest("argv must not be empty")
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise BadRequest(f"argv[{i}] must be a str, got {type(arg).__name__}")
    if env is not None and not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                              for k, v in env.items())):
        raise BadRequest("env must be a dict of str to str")
    if limits is not None and not isinstance(limits, Limits):
        raise BadRequest(f"limits must be a fabric.Limits, got {type(limits).__name__}")
    if sandbox is not None and not isinstance(sandbox, Sandbox):
        raise BadRequest(f"sandbox must be a fabric.Sandbox, got {type(sandbox).__name__}")
    native = None
    if executable is not None:
        data = bytes(executable)
        native = NativeExec(sha256=hashlib.sha256(data).hexdigest(),
                            architecture=architecture or platform.machine(), data=data)
    req = SpawnRequest(argv=list(argv), env=env, cwd=cwd, stdin=None if stdin is None else bytes(stdin),
                       stdin_open=stdin_open, limits=limits, sandbox=sandbox, strict=strict, clear_env=clear_env,
                       tail_bytes=tail_bytes, owner=owner, native=native)
    # the same validation the spawner applies (negative limits, wrong types), raised here as BadRequest
    JSON.decode(JSON.encode(req), SpawnRequest)
    return req


class _ProcOutput:
    """What the spawner streamed to this client's inbox: the chunks of each stream, then the exit.

    Filled on the client's loop; read from it (async iterators) or from any thread
    (the sync client's iterators wait on the condition).
    """

    def __init__(self) -> None:
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.exit: ExitInfo | None = None
        self.cond = threading.Condition()
        self.changed = asyncio.Event()
        self.sub: Any = None
        self.streamed = True

    def check_streamed(self) -> None:
        if not self.streamed:
            raise BadRequest("this process was spawned with stream=False: it has no output stream here "
                             "(wait() returns the tails)")

    async def on_message(self, msg: Any) -> None:
        stream = (msg.headers or {}).get(STREAM_HEADER, "")
        with self.cond:
            if stream in self.chunks:
                self.chunks[stream].append(msg.data)
            elif stream == "exit":
                self.exit = JSON.decode(msg.data, ExitInfo)
            self.cond.notify_all()
        old, self.changed = self.changed, asyncio.Event()
        old.set()
        if stream == "exit" and self.sub is not None:
            sub, self.sub = self.sub, None
            await sub.unsubscribe()

    def take(self, stream: str, index: int) -> tuple[list[bytes], bool]:
        """Chunks from *index* on, and whether the stream is complete (the exit arrived)."""
        with self.cond:
            return self.chunks[stream][index:], self.exit is not None


def _split_lines(pending: bytes, chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    data = pending + b"".join(chunks)
    lines = data.split(b"\n")
    rest = lines.pop()
    return [line + b"\n" for line in lines], rest


class AsyncRemoteProcess(ProcessRef):
    """A process started by :meth:`AsyncFabricClient.rspawn`.

    ``id`` (``<node>:<local>``) reaches it from anywhere; ``async for line in proc.stdout``
    yields its output lines (bytes, with their ``\\n``) from the very first one;
    ``await proc.wait()`` returns the :class:`~fabric.schema.ExitInfo`.
    """

    def __init__(self, client: AsyncFabricClient, reply: SpawnReply, out: _ProcOutput) -> None:
        self.client = client
        self.id = reply.id
        self.node = reply.node
        self.pid = reply.pid
        self.subject = reply.subject
        self.enforced = reply.enforced
        self.unenforced = reply.unenforced
        self._out = out

    def __repr__(self) -> str:
        return f"AsyncRemoteProcess(id={self.id!r}, pid={self.pid})"

    @property
    def stdout(self) -> AsyncIterator[bytes]:
        return self._lines("stdout")

    @property
    def stderr(self) -> AsyncIterator[bytes]:
        return self._lines("stderr")

    async def _lines(self, stream: str) -> AsyncIterator[bytes]:
        out, index, pending = self._out, 0, b""
        out.check_streamed()
        while True:
            changed = out.changed
            chunks, complete = out.take(stream, index)
            index += len(chunks)
            lines, pending = _split_lines(pending, chunks)
            for line in lines:
                yield line
            if complete and not chunks:
                if pending:
                    yield pending
                return
            if not chunks:
                await changed.wait()

    async def wait(self, timeout: float | None = None) -> ExitInfo:
        """The exit (``exit_code``, ``signal``, ``cpu_s``, ``max_rss`` and ``max_rss_exact``, ``duration_s``, tails)."""
        if self._out.exit is not None:
            return self._out.exit
        return await self.client.rwait(self.id, timeout)

    async def kill(self, signal: int | str = "SIGKILL") -> bool:
        return await self.client.rkill(self.id, signal)

    async def write_stdin(self, data: bytes, *, eof: bool = False) -> int:
        return await self.client.rwrite_stdin(self.id, data, eof=eof)

    async def status(self) -> ProcStatus:
        return await self.client.rstatus(self.id)


class ProcessesArea(Transport):
    """Remote processes (the spawner): the ``rspawn`` family of the async client."""

    async def rspawn(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                     stdin: bytes | None = None, limits: Limits | None = None, sandbox: Sandbox | None = None,
                     node: str | None = None, stdin_open: bool = False, strict: bool = True,
                     clear_env: bool = False, tail_bytes: int = 64 << 10, executable: bytes | None = None,
                     architecture: str | None = None, stream: bool = True) -> AsyncRemoteProcess:
        """Start *argv* on *node* (default: any spawner); returns at once with an :class:`AsyncRemoteProcess`.

        Its ``stdout``/``stderr`` iterate lines from the first byte (the client subscribes
        before the spawn, ``stream=False`` skips that), ``wait()`` returns the exit.
        *executable* sends a native (ELF) binary run as argv[0]: stored once per node by
        its sha256, later spawns send only the digest.  ``strict=False`` runs even when a
        limit cannot be enforced (``proc.unenforced`` says which).

        >>> proc = await fc.rspawn(["echo", "hi"])       # doctest: +SKIP
        >>> (await proc.wait()).stdout
        b'hi\\n'
        """
        req = _spawn_request(argv, env=env, cwd=cwd, stdin=stdin, limits=limits, sandbox=sandbox,
                             stdin_open=stdin_open, strict=strict, clear_env=clear_env, tail_bytes=tail_bytes,
                             owner=self.owner, executable=executable, architecture=architecture)
        out = _ProcOutput()
        sub = None
        if stream:
            if self.nc is None:
                raise Unavailable("client is not connected: use 'async with' or call connect()")
            req.stream_to = self.nc.new_inbox()
            sub = await self.nc.subscribe(req.stream_to, cb=out.on_message)
        out.sub = sub  # set before the spawn: the exit may arrive before its reply
        out.streamed = stream
        try:
            reply = await self._spawn_call(node, req)
        except BaseException:
            if out.sub is not None:
                await out.sub.unsubscribe()
            raise
        return AsyncRemoteProcess(cast("AsyncFabricClient", self), reply, out)

    async def _spawn_call(self, node: str | None, req: SpawnRequest, timeout: float | None = None) -> SpawnReply:
        subject = (subjects.node_scoped(subjects.PROC, node, subjects.Proc.SPAWN) if node
                   else subjects.cluster(subjects.PROC, subjects.Proc.SPAWN))
        native = req.native
        if native is not None and not native.signature:
            native.signature = self._sign(file_message(native.sha256))  # "" without a signing key
        if native is not None and native.data is not None and self.nc is not None \
                and len(native.data) * 4 // 3 + FRAME_OVERHEAD > self.nc.max_payload:
            raise TooLarge(f"a {len(native.data)}-byte executable does not fit one request (base64 in JSON) under "
                           f"the server's max payload of {self.nc.max_payload} bytes")
        if native is not None and native.data is not None:
            # by digest first: the node may have it already, then nothing is resent
            data, native.data = native.data, None
            try:
                return await self._call(subject, req, SpawnReply, timeout)
            except ExecutableNotFound:
                native.data = data
        return await self._call(subject, req, SpawnReply, timeout)

    async def rrun(self, argv: Sequence[str], *, timeout: float = 60.0, node: str | None = None,
                   announce: bool = False, **options: Any) -> ExitInfo:
        """Run *argv* to its end in ONE round trip (the spawn waits up to *timeout* s for the exit).

        Returns the exit (with the output tails); raises ``TimeoutError`` -- after killing
        the process -- when it is still running after *timeout*.  The output is not
        published on the process's subject unless ``announce=True`` (the reply carries
        it).  *options* are rspawn's.
        """
        req = _spawn_request(argv, owner=self.owner, **options)
        req.wait_s = timeout
        req.announce = announce
        reply = await self._spawn_call(node, req, timeout + self.timeout)
        if reply.exit is None:
            await self.rkill(reply.id)
            raise TimeoutError(f"process {reply.id} still running after {timeout}s: killed")
        return reply.exit

    async def rwait(self, proc: str | AsyncRemoteProcess, timeout: float | None = None) -> ExitInfo:
        """Wait for the process to end; ``TimeoutError`` if it still runs after *timeout* seconds."""
        proc_id = _proc_id(proc)
        subject = subjects.node_scoped(subjects.PROC, _proc_node(proc_id), subjects.Proc.WAIT)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = 60.0 if deadline is None else max(0.0, deadline - loop.time())
            step = min(left, 60.0)
            st = await self._call(subject, WaitRequest(id=proc_id, timeout_s=step), ProcStatus, step + self.timeout)
            if st.exit is not None:
                return st.exit
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"process {proc_id} still running after {timeout}s")

    async def rkill(self, proc: str | AsyncRemoteProcess, signal: int | str = "SIGKILL") -> bool:
        """Send *signal* to the process's whole group; False when it had already ended."""
        proc_id = _proc_id(proc)
        if isinstance(signal, bool) or not isinstance(signal, (int, str)):
            raise BadRequest(f"signal must be a number or a name like 'SIGTERM', got {type(signal).__name__}")
        r = await self._call(subjects.node_scoped(subjects.PROC, _proc_node(proc_id), subjects.Proc.KILL),
                             KillRequest(id=proc_id, signal=signal), KillReply)
        return r.delivered

    async def rwrite_stdin(self, proc: str | AsyncRemoteProcess, data: bytes, *, eof: bool = False) -> int:
        """Write to the stdin of a process spawned with ``stdin_open=True``; ``eof`` closes it."""
        proc_id = _proc_id(proc)
        r = await self._call(subjects.node_scoped(subjects.PROC, _proc_node(proc_id), subjects.Proc.STDIN),
                             StdinRequest(id=proc_id, data=bytes(data), eof=eof), StdinReply)
        return r.written

    async def rstatus(self, proc: str | AsyncRemoteProcess) -> ProcStatus:
        """State, live CPU %, RSS and member count of the process (its whole group)."""
        proc_id = _proc_id(proc)
        return await self._call(subjects.node_scoped(subjects.PROC, _proc_node(proc_id), subjects.Proc.STATUS),
                                ProcRequest(id=proc_id), ProcStatus)

    async def rlist(self, node: str, *, finished: bool = False) -> list[ProcStatus]:
        r = await self._call(subjects.node_scoped(subjects.PROC, node, subjects.Proc.LIST),
                             ProcListRequest(finished=finished), ProcListReply)
        return r.processes

    async def spawner_info(self, node: str) -> SpawnerInfoReply:
        return await self._call(subjects.node_scoped(subjects.PROC, node, subjects.Proc.INFO), ProcListRequest(),
                                SpawnerInfoReply)
