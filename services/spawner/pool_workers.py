"""The workers of a warm pool: a ring-joined child process, or an external socket peer.

Both speak protocol v1 (:mod:`fabric_ext.wire`, the spec in docs/protocol.md): the
controller sends the version exchange, then "new compute core", then jobs; the
worker answers each message with the same id.  Job messages use the job's id as
their message id, so a result finds its job by id, whatever order it comes in.

:class:`RingWorker` runs ``python -P -m fabric.services.spawner.worker --ring-in A --ring-out B
--spin-us N`` (through :func:`fabric.launch.module_launch`; its job ring spins a little
longer than the ring's default before it sleeps) with two fresh :mod:`fabric_ext.ring`
files in /dev/shm.  A reader thread blocks in
``Consumer.pop()`` (the GIL released) and hands what it finds to the loop in one
``call_soon_threadsafe``; the process's exit is watched through a pidfd on the
loop, and only once the reader has drained the ring does the pool learn which jobs
were lost -- so a result the worker pushed just before dying is never reported as
a crash.

:class:`SocketWorker` is a peer that connected to a pool's listening socket
(``examples/cores/worker.c``); the stream is cut into frames by ``wire.V1Decoder``.

A worker knows nothing of the pool or the manager above it: it reports through the
:class:`PoolEvents` it is given (a job finished, a worker failed or is gone, hand out
more work), and gets its settings (:class:`~.pool_types.PoolEnv`, the ring file prefix,
the reply link, the set to record its child pid in) at construction.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from typing import Any, Protocol

from fabric.errors import CoreLoadFailed, FabricError, JobError, JobTimeout, TooLarge, Unavailable, WorkerCrashed
from fabric.launch import module_launch
from fabric.protocol import wire
from fabric.protocol.env import CORE_ID_ENV  # set in each ring worker's environment to its core id
from fabric_ext import ring

from .core_api import OUTPUT_TOO_LARGE
from .pool_reply import ReplyLink
from .pool_types import OUTPUT_HINT, Job, PoolEnv, WorkerSpec
from .worker_user import RunAs, cannot_run
from .worker_user import launch as worker_launch

__all__ = ["Worker", "RingWorker", "SocketWorker", "WorkerSpec", "PoolEvents", "RING_CAPACITY", "CORE_ID_ENV",
           "OUTPUT_HINT"]

#: bytes of each ring (a power of two); a job's frame must fit one record
RING_CAPACITY = 16 << 20
#: bytes of job data an external worker may have queued on its socket
SOCKET_WINDOW = 64 << 20
#: message ids of the version exchange and core messages (far from job ids)
_CTRL_VERSION = 1 << 62
_CTRL_CORE = (1 << 62) + 1


class PoolEvents(Protocol):
    """What a worker tells its pool; the pool implements it and passes itself in."""

    def finished(self, job: Job, exit_code: int, out: Any, err: FabricError | None) -> None:
        """*job* ended: its output, or the error it failed with."""

    def pump(self) -> None:
        """The worker can take more jobs."""

    def worker_failed(self, worker: Worker, why: str) -> None:
        """The worker broke the protocol or its transport failed; it is being killed."""

    def worker_gone(self, worker: Worker, reason: JobError | None, lost: list[Job]) -> None:
        """The worker ended; *lost* are its unanswered jobs (the first ran, failing with *reason*)."""


def _signal_name(rc: int) -> str:
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"


class Worker:
    """What a pool needs from a worker, whatever joins it to the controller."""

    external = False
    #: the most job data this worker may hold at once (set by the transport)
    max_job = 0

    def __init__(self, events: PoolEvents, spec: WorkerSpec, seq: int) -> None:
        self.events = events
        self.spec = spec
        self.seq = seq
        self.loop = asyncio.get_running_loop()
        #: jobs sent and not answered, in the order the worker runs them
        self.outstanding: dict[int, Job] = {}
        self.inflight_bytes = 0
        self.ready = False
        self.was_ready = False
        self.head_started = 0.0
        self.idle_since = time.monotonic()
        self._ctrl: dict[int, asyncio.Future[Any]] = {}
        self._timed_out: JobTimeout | None = None
        self._failure = ""
        self._retiring = False
        self._gone = asyncio.Event()
        self._ended = False

    # -- transport (subclasses) ------------------------------------------------------

    def _push(self, head: bytes, data: Any) -> None:
        raise NotImplementedError

    def _push_frame(self, frame: bytes) -> None:
        raise NotImplementedError

    def _kill(self) -> None:
        """End the worker now (SIGKILL, or cut the connection)."""
        raise NotImplementedError

    def _end_gracefully(self) -> None:
        raise NotImplementedError

    def _death_text(self) -> str:
        return "the worker died"

    # -- protocol -----------------------------------------------------------------

    async def handshake(self, timeout: float) -> None:
        """Version exchange, then "new compute core"; CoreLoadFailed when refused."""
        spec = self.spec
        kind, payload = await self._control(_CTRL_VERSION, wire.v1_version(_CTRL_VERSION, wire.V1_VERSION), timeout)
        if kind != wire.V1_OK:
            raise CoreLoadFailed(f"worker refused protocol version {wire.V1_VERSION}: "
                                 f"{bytes(payload).decode('utf-8', 'replace')}", core=spec.core)
        try:
            accepted = wire.v1_parse_version_reply(payload)
        except ValueError as exc:
            raise CoreLoadFailed(f"worker sent a malformed version reply: {exc}", core=spec.core) from None
        if not accepted:
            raise CoreLoadFailed(f"worker does not speak protocol version {wire.V1_VERSION}", core=spec.core)
        kind, payload = await self._control(_CTRL_CORE, wire.v1_core(_CTRL_CORE, spec.name, spec.library), timeout)
        if kind != wire.V1_OK:
            raise CoreLoadFailed(f"core {spec.name!r} did not load: {bytes(payload).decode('utf-8', 'replace')}",
                                 core=spec.core, name=spec.name)
        self.ready = self.was_ready = True
        self.idle_since = time.monotonic()

    async def _control(self, msg_id: int, frame: bytes, timeout: float) -> tuple[int, memoryview]:
        fut: asyncio.Future[tuple[int, memoryview]] = self.loop.create_future()
        self._ctrl[msg_id] = fut
        self._push_frame(frame)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise CoreLoadFailed(f"worker did not answer within {timeout:g}s") from None
        finally:
            self._ctrl.pop(msg_id, None)

    def accepts(self, size: int) -> bool:
        return self.inflight_bytes + size <= self.max_job

    def send_job(self, job: Job) -> None:
        size = len(job.data)
        if size > self.max_job:
            raise TooLarge(f"job of {size} bytes exceeds the worker's limit of {self.max_job}")
        out = self.outstanding
        if not out:
            self.head_started = time.monotonic()
        out[job.id] = job
        self.inflight_bytes += size
        self._push(wire.v1_job_header(job.id, job.id, size), job.data)

    def on_frames(self, frames: list[Any]) -> None:
        """Results (and control replies) from the worker, in the loop."""
        out = self.outstanding
        pool = self.events
        spec = self.spec
        ok = wire.V1_OK
        parse = wire.v1_parse_job_result
        for f in frames:
            mid = f.msg_id
            job = out.pop(mid, None)
            if job is None:
                fut = self._ctrl.get(mid)
                if fut is not None and not fut.done():
                    fut.set_result((f.kind, f.payload))
                else:
                    self.fail(f"answer to unknown message id {mid}")
                continue
            self.inflight_bytes -= len(job.data)
            if f.kind == ok:
                if job.replied:  # the reader thread parsed it, found exit code 0 and answered
                    pool.finished(job, 0, b"", None)
                    continue
                try:
                    code, data = parse(f.payload)
                except ValueError as exc:
                    pool.finished(job, 0, b"", JobError(f"malformed job result: {exc}", core=spec.core))
                    continue
                pool.finished(job, code, data, None)
            else:
                text = bytes(f.payload).decode("utf-8", "replace")
                if text.startswith(OUTPUT_TOO_LARGE):  # the output is too big for the ring, not a worker fault
                    err: JobError | TooLarge = TooLarge(
                        f"core {spec.name!r}: {text[len(OUTPUT_TOO_LARGE):]}; {OUTPUT_HINT}", core=spec.core)
                else:
                    err = JobError(f"worker error: {text}", core=spec.core)
                pool.finished(job, 0, b"", err)
        now = time.monotonic()
        if out:
            self.head_started = now  # the next queued job starts as this one ends
        else:
            self.idle_since = now
        pool.pump()

    def time_out(self, limit: float) -> None:
        if self._timed_out is None:
            self._timed_out = JobTimeout(f"job ran past the time limit of {limit:g}s of core {self.spec.name!r}; "
                                         f"its worker was killed and replaced", core=self.spec.core,
                                         time_limit_s=limit)
            self.ready = False
            self._kill()

    def fail(self, why: str) -> None:
        if not self._failure:
            self._failure = why
            self.events.worker_failed(self, why)
            self.ready = False
            self._kill()

    def retire(self) -> None:
        if not self._retiring:
            self._retiring = True
            self.ready = False
            self._end_gracefully()

    def ended(self) -> None:
        """The worker is gone and everything it sent was delivered: settle its jobs."""
        if self._ended:
            return
        self._ended = True
        self.ready = False
        text = self._death_text()
        for fut in self._ctrl.values():
            if not fut.done():
                fut.set_exception(CoreLoadFailed(f"worker ended during start: {text}", core=self.spec.core))
        lost = list(self.outstanding.values())
        self.outstanding.clear()
        self.inflight_bytes = 0
        reason: JobError | None = None
        if self._timed_out is not None:
            reason = self._timed_out
        elif lost or (self.was_ready and not self._retiring):
            reason = WorkerCrashed(f"worker of core {self.spec.name!r} died running the job ({text}); "
                                   f"the pool replaced it", core=self.spec.core)
        self._gone.set()
        self.events.worker_gone(self, reason, lost)

    async def start(self, timeout: float) -> None:
        raise NotImplementedError

    async def stop(self, kill_after: float) -> None:
        """Ask the worker to end, kill it after *kill_after* seconds, wait until it is gone."""
        self.retire()
        try:
            await asyncio.wait_for(self._gone.wait(), kill_after)
        except asyncio.TimeoutError:
            self._kill()
            await asyncio.wait_for(self._gone.wait(), 10.0)


class RingWorker(Worker):
    """A ``fabric.services.spawner.worker`` child process joined by two SPSC rings."""

    def __init__(self, events: PoolEvents, spec: WorkerSpec, seq: int, *, ring_prefix: str,
                 link: ReplyLink | None, env: PoolEnv, children: set[int], run_as: RunAs | None = None) -> None:
        super().__init__(events, spec, seq)
        base = f"{ring_prefix}-{spec.core}-{seq}"
        #: the OS user a client's worker runs as (sandbox.client_user: worker_user.py); None: the spawner's
        self.run_as = run_as
        #: answers successful ``run`` jobs straight from the reader thread (None: through the loop)
        self.link = link
        self.env = env
        #: where this worker's pid stays until it is reaped (the spawner's orphan sweep spares them)
        self.children = children
        self.path_in = f"{base}-in"
        self.path_out = f"{base}-out"
        self.prod: Any = None
        self.cons: Any = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd = -1
        self.returncode: int | None = None
        self._thread: threading.Thread | None = None
        self._reader_finished = False
        # frames sent (loop) and answers read (reader thread): the reader pops only while
        # answers are due, and otherwise waits to be kicked -- so a job's send wakes it
        # alongside the worker, and it is spinning on the ring when the result lands
        self._sent = 0
        self._received = 0
        self._kick = threading.Event()
        self._exited = False

    async def start(self, timeout: float) -> None:
        spec = self.spec
        made: list[str] = []
        try:
            for path in (self.path_in, self.path_out):
                ring.create(path, RING_CAPACITY)
                made.append(path)
            self.prod = ring.Producer(self.path_in)
            self.cons = ring.Consumer(self.path_out, spin_us=self.env.reader_spin_us)
            # a job frame is its 33-byte header plus the data, in one record
            self.max_job = self.prod.max_record - 64
            # lets the gpu-monitor name the core a GPU-holding worker process belongs to
            env = {**os.environ, **dict(spec.env), CORE_ID_ENV: spec.core}
            args = ["--ring-in", self.path_in, "--ring-out", self.path_out, "--spin-us", str(self.env.worker_spin_us)]
            run_as = self.run_as
            if run_as is None:
                # -P, and the spawner's own working directory (the state directory under `fabric up`)
                launch = module_launch("fabric.services.spawner.worker", args, cwd=None, env=env)
                self.proc = subprocess.Popen(launch.argv, cwd=launch.cwd, env=launch.env, stdin=subprocess.DEVNULL,
                                             close_fds=True)
            else:
                for path in made:  # its rings are the only files of the node it may open
                    os.chown(path, run_as.uid, run_as.gid)
                env.pop("PYTHONPATH", None)
                env["HOME"] = run_as.home or "/"
                env.pop("XDG_CACHE_HOME", None)
                try:
                    # as that user from the exec on, in / (the state directory is not its to read)
                    self.proc = subprocess.Popen(worker_launch(run_as, "fabric.services.spawner.worker", args),
                                                 cwd="/", env=env, stdin=subprocess.DEVNULL, close_fds=True,
                                                 user=run_as.uid, group=run_as.gid, extra_groups=[])
                except PermissionError as exc:
                    raise Unavailable(cannot_run(run_as, exc), core=spec.core) from None
        except BaseException:
            self._release()
            raise
        self.children.add(self.proc.pid)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.loop.add_reader(self.pidfd, self._on_exit)
        self._thread = threading.Thread(target=self._read, name=f"core-{spec.core}-{self.seq}", daemon=True)
        self._thread.start()
        await self.handshake(timeout)

    def _read(self) -> None:
        """The reader thread: block in pop() (GIL released), parse, hand results to the loop in batches.

        A successful job whose request waits on a reply subject is answered from here,
        on the manager's :class:`~.pool_reply.ReplyLink`, before the loop hears of it.
        """
        cons = self.cons
        pop, try_pop = cons.pop, cons.try_pop
        kick = self._kick
        call = self.loop.call_soon_threadsafe
        deliver = self.on_frames
        parse, parse_result, ok = wire.v1_parse, wire.v1_parse_job_result, wire.V1_OK
        out = self.outstanding
        link = self.link
        closed = False
        try:
            while not closed:
                kick.clear()
                if self._received >= self._sent and not self._exited:
                    kick.wait()
                    continue
                batch: list[Any] = []
                rec: Any = None
                try:
                    rec = pop()
                    while rec is not None:
                        try:
                            f = parse(rec)
                        except ValueError as exc:
                            call(self.fail, f"malformed frame on the result ring: {exc}")
                        else:
                            batch.append(f)
                            if link is not None and f.kind == ok:
                                job = out.get(f.msg_id)
                                if job is not None and job.reply is not None:
                                    try:
                                        code, data = parse_result(f.payload)
                                    except ValueError:
                                        code = -1
                                    if code == 0:
                                        # marked first: the caller may ask for the pool's stats as soon as
                                        # the reply is out, and they count a replied job as done
                                        job.replied = True
                                        if not link.publish(job.reply, data):
                                            job.replied = False
                        self._received += 1
                        if len(batch) >= 1024:
                            break
                        rec = try_pop()
                except ring.RingCorrupt:
                    call(self.fail, "a corrupt record on the result ring")
                except ring.RingClosed:
                    closed = True  # deliver what this batch holds, then end
                if batch:
                    call(deliver, batch)
        except RuntimeError:  # the loop is closed: the service is gone
            return
        except Exception as exc:  # pragma: no cover - a ring bug: end this worker, keep the pool
            try:
                call(self.fail, f"result ring failed: {exc!r}")
            except RuntimeError:
                return
        try:
            call(self._reader_done)
        except RuntimeError:
            pass

    def _on_exit(self) -> None:
        """The pidfd is readable: the process exited.  Reap it; let the reader drain the ring."""
        self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        assert self.proc is not None
        self.returncode = self.proc.wait()
        self.children.discard(self.proc.pid)
        self.ready = False
        self._exited = True
        self._kick.set()
        if self._reader_finished:  # the worker closed its result ring itself on the way out
            self._settle()
            return
        try:
            self.cons.shutdown()  # the reader drains what is left, then sees RingClosed
        except Exception:
            self._kill()

    def _reader_done(self) -> None:
        self._reader_finished = True
        if self.pidfd >= 0:  # the reader ended first (the worker closed the ring): wait for the exit
            return
        self._settle()

    def _settle(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self._release()
        self.ended()

    def _release(self) -> None:
        for end in (self.prod, self.cons):
            if end is not None:
                try:
                    end.close()
                except Exception:
                    pass
        self.prod = self.cons = None
        for path in (self.path_in, self.path_out):
            try:
                ring.unlink(path)
            except (FileNotFoundError, OSError):
                pass

    def _death_text(self) -> str:
        if self._failure:
            return self._failure
        return _signal_name(self.returncode) if self.returncode is not None else "the worker died"

    def _push(self, head: bytes, data: Any) -> None:
        self.prod.push_parts(head, data, timeout=1.0)
        self._sent += 1
        if self._sent - self._received == 1:  # the reader may be waiting: wake it with the worker
            self._kick.set()

    def _push_frame(self, frame: bytes) -> None:
        self.prod.push(frame, timeout=1.0)
        self._sent += 1
        self._kick.set()

    def _kill(self) -> None:
        if self.proc is not None and self.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def _end_gracefully(self) -> None:
        # the worker exits when its job ring is shut down
        if self.prod is not None:
            try:
                self.prod.shutdown()
            except Exception:
                self._kill()
        else:
            self._kill()

    async def stop(self, kill_after: float) -> None:
        if self.proc is None:  # never started (no ring, no fork): just leave the pool
            self._release()
            self.ended()
            return
        await super().stop(kill_after)


class SocketWorker(Worker):
    """An external worker that connected to a pool's listening socket."""

    external = True
    max_job = SOCKET_WINDOW

    def __init__(self, events: PoolEvents, spec: WorkerSpec, seq: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        super().__init__(events, spec, seq)
        self.reader = reader
        self.writer = writer
        self._task: asyncio.Task[None] | None = None
        self._eof_text = "the connection closed"

    async def start(self, timeout: float) -> None:
        self._task = self.loop.create_task(self._read())
        await self.handshake(timeout)

    async def _read(self) -> None:
        decoder = wire.V1Decoder()
        try:
            while True:
                data = await self.reader.read(1 << 20)
                if not data:
                    break
                try:
                    frames = decoder.feed(data)
                except ValueError as exc:
                    self._eof_text = f"malformed v1 frame: {exc}"
                    self._fail_ctrl(f"the worker sent a malformed v1 frame: {exc}")
                    break
                if frames:
                    self.on_frames(frames)
        except (ConnectionError, OSError) as exc:
            self._eof_text = f"connection lost: {exc}"
        finally:
            self.writer.close()
            self.ended()

    def _fail_ctrl(self, text: str) -> None:
        for fut in self._ctrl.values():
            if not fut.done():
                fut.set_exception(CoreLoadFailed(text, core=self.spec.core))

    def _death_text(self) -> str:
        return self._failure or self._eof_text

    def _push(self, head: bytes, data: Any) -> None:
        self.writer.writelines((head, data))

    def _push_frame(self, frame: bytes) -> None:
        self.writer.write(frame)

    def _kill(self) -> None:
        transport = self.writer.transport
        if transport is not None:
            transport.abort()

    def _end_gracefully(self) -> None:
        self.writer.close()
