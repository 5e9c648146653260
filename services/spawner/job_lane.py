"""The job lane: ``fabric.core.<node>.run.<core>`` and ``.map.<core>`` from NATS to a pool and back.

Jobs come on the hosting service's NATS connection (the kit's), subscribed in the
service queue group with pending limits far above the kit's defaults, whose callbacks
hand a job to its pool without a task per request; a successful ``run`` is answered
straight from the worker's reader thread on the reply link
(:class:`~.pool_reply.ReplyLink`, the spawner's second connection), everything else
from the loop.  The two endpoints are counted here and listed in the hosting service's ``$SRV``.

Reply size: no reply goes out above what the server takes (its ``max_payload``, less
:data:`~.pool_reply.REPLY_HEADROOM` for headers: :meth:`JobLane.reply_limit`).  A ``run``
whose output is bigger is answered 413 ``too_large`` at once; a ``map`` keeps the
outputs that fit, in input order, and puts 413 in the slots of the jobs whose output
does not (see :func:`fit_results`).

Connections, decided by measurement (``bench/job_lane.py`` at commit e55f67c, which ran
both designs; docs/benchmarks.md, "The job lane's connections"): the lane once had a
nats-py connection of its own beside the kit's.  Measured in the same runs, the lane on the kit's connection was as fast
within the noise of the 2-core machine (empty ``run`` p50 0.98-1.03x, ``map`` rate
0.87-1.21x, six runs), so it shares the kit's: one connection less to name, authenticate
and reconnect.  The reply link stays, for its own measured reason: without it an empty
``run`` took 5-16 % longer (22-75 us) in the same runs (``python bench/job_lane.py``
measures that today).  So a spawner holds two NATS
connections: ``spawner@<node>`` (the kit's, with the lane) and ``spawner-replies@<node>``.
The lane neither opens nor closes the kit's connection: :meth:`JobLane.unsubscribe`
drains its subscriptions first, the kit drains the connection after ``on_stop``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError

from fabric.errors import FabricError, JobFailed, TooLarge, error_headers
from fabric.protocol import subjects
from fabric.protocol.headers import EXIT_CODE_HEADER
from fabric.protocol.jobframes import decode_job_batch, encode_job_results, results_frame_size
from fabric.protocol.permissions import caller_of
from fabric.service import Endpoint, node_endpoint
from fabric.service_endpoint import with_user_forms

from .pool import Pool
from .pool_reply import REPLY_HEADROOM, ReplyLink, reply_limit
from .pool_types import OUTPUT_HINT, Job

__all__ = ["JobLane", "fit_results"]



def _lane_only(req: Any) -> None:
    raise AssertionError("the job lane serves core run/map itself (JobLane.open)")


class JobLane:
    """The job lane of one manager: its NATS connection and reply link, the run/map handlers."""

    def __init__(self, node: str, log: Any, nats_url: str, lookup: Callable[[str, str | None], Pool],
                 seed: str | None = None) -> None:
        self.node = node
        self.log = log
        self.nats_url = nats_url
        #: the spawner's nkey seed, for the reply link's own connection (None without auth)
        self._seed = seed
        #: the pool of a core id (NotFound when there is none)
        self._pool = lookup
        self.link: ReplyLink | None = None
        self.nc: NATS | None = None
        self._subs: list[Any] = []
        self._job_ids = itertools.count(1)
        self._sends: set[asyncio.Task[Any]] = set()
        self._retry_link_at = 0.0
        # served on the lane (open()), counted here, listed in $SRV (the manager's side_endpoints)
        # (the kit never calls their handlers: open() subscribes them with _on_run/_on_map)
        self._run_ep = node_endpoint(subjects.CORE, node, subjects.Core.RUN, _lane_only, name="core-run",
                                     wildcard=True)
        self._map_ep = node_endpoint(subjects.CORE, node, subjects.Core.MAP, _lane_only, name="core-map",
                                     wildcard=True)

        #: both, in their plain and user forms: what open() subscribes, each counting its own requests
        self._endpoints = with_user_forms([self._run_ep, self._map_ep])

    def endpoints(self) -> list[Endpoint]:
        return self._endpoints

    async def open(self, nc: NATS) -> None:
        """Open the reply link (before any worker starts), then subscribe on *nc*: the hosting
        service's connection, which the lane uses but never closes."""
        self.nc = nc
        # the reader threads hold on to this link for good; tend_link() reconnects it
        self.link = ReplyLink(self.nats_url, f"spawner-replies@{self.node}", self.log, seed=self._seed)
        await asyncio.get_running_loop().run_in_executor(None, self.link.connect)
        for ep in self._endpoints:
            on_msg = self._on_run if ep.name.startswith(self._run_ep.name) else self._on_map
            cb = functools.partial(on_msg, ep)
            # far above the kit's defaults: a map client keeps thousands of jobs in flight, and a
            # slow-consumer drop here would lose jobs on the connection every endpoint shares
            self._subs.append(await nc.subscribe(ep.subject, queue=ep.queue_group, cb=cb,
                                                 pending_msgs_limit=1 << 20, pending_bytes_limit=1 << 30))
        await nc.flush()

    async def unsubscribe(self) -> None:
        """Take no more jobs: drain the subscriptions, so the jobs the server already sent reach
        their pools (which finish them, or answer them ``unloaded``) rather than vanish."""
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await asyncio.wait_for(sub.drain(), timeout=5)
            except Exception:  # the connection is closed or draining already: nothing left to take
                try:
                    await sub.unsubscribe()
                except Exception:
                    pass

    async def close(self) -> None:
        """Send what is still going out, then close the reply link; the connection stays the
        kit's to drain (after ``on_stop``)."""
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=5)
        if self.link is not None:
            self.link.close()
            self.link = None
        self.nc = None

    async def tend_link(self, now: float) -> None:
        """Reconnect the reply link after the server restarted (at most every 2 s)."""
        link = self.link
        if link is not None and link.usable and not link.up and now >= self._retry_link_at:
            self._retry_link_at = now + 2.0  # replies go through the loop meanwhile
            await asyncio.get_running_loop().run_in_executor(None, link.connect)

    def reply_limit(self) -> int:
        """The largest output (or ``map`` results frame) a reply on the job lane may carry."""
        return reply_limit(self.nc.max_payload) if self.nc is not None else 0

    def too_large(self, pool: Pool, size: int, exit_code: int = 0, what: str = "the job's output") -> TooLarge:
        """The 413 for an output of *size* bytes that no reply can carry."""
        mp = self.nc.max_payload if self.nc is not None else 0
        code = f" (exit code {exit_code})" if exit_code else ""
        return TooLarge(f"core {pool.name!r}: {what} of {size} bytes{code} is more than a reply carries: "
                        f"{reply_limit(mp)} bytes (the NATS server's max payload of {mp} less {REPLY_HEADROOM} "
                        f"for headers); {OUTPUT_HINT}", core=pool.id, size=size, max_payload=mp)

    def _send(self, subject: str, data: Any, headers: dict[str, str] | None = None) -> None:
        """Publish a reply from the loop (errors, batches, anything the reader thread did not send)."""
        if self.nc is None or not subject:
            return
        task = asyncio.get_running_loop().create_task(self._publish(subject, data, headers))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _publish(self, subject: str, data: Any, headers: dict[str, str] | None) -> None:
        nc = self.nc
        if nc is None:  # closed since the send was scheduled
            return
        try:
            try:
                await nc.publish(subject, data, headers=headers)
            except MaxPayloadError:
                # the callers check sizes (reply_limit); should one slip through, the client still
                # gets an answer rather than waiting out its timeout
                mp = nc.max_payload
                exc = TooLarge(f"a reply of {len(data)} bytes is above the NATS server's max payload of {mp} "
                               f"bytes; {OUTPUT_HINT}")
                await nc.publish(subject, b"", headers=error_headers(exc))
        except Exception as exc:  # connection lost: the client times out
            self.log.warning("job reply not sent", error=str(exc))

    def _send_error(self, subject: str, exc: FabricError) -> None:
        self._send(subject, b"", error_headers(exc))

    async def _on_run(self, ep: Endpoint, msg: Any) -> None:
        """``fabric.core.<node>.run.<core>``: the body is the job's input; the reply its output."""
        t0 = time.perf_counter_ns()
        reply = msg.reply
        try:
            pool = self._pool(msg.subject.rpartition(".")[2], caller_of(msg.subject))
        except FabricError as exc:
            ep.record(t0, exc.message)
            self._send_error(reply, exc)
            return
        link = self.link
        direct = reply.encode() if reply and link is not None and link.up else None
        job = Job(next(self._job_ids), msg.data, _noop, direct)
        job.done = functools.partial(self._run_done, ep, job, reply, pool, t0)
        pool.submit(job)

    def _run_done(self, ep: Endpoint, job: Job, reply: str, pool: Pool, t0: int, code: int, out: Any,
                  err: FabricError | None) -> None:
        ep.record(t0, err.message if err is not None else
                            f"exit code {code}" if code != 0 else None)
        if job.replied:
            return
        if err is None and len(out) > self.reply_limit():
            pool.output_refused(code)
            err = self.too_large(pool, len(out), code)
        if err is not None:
            self._send_error(reply, err)
        elif code != 0:
            headers = error_headers(JobFailed(f"core {pool.name!r} returned exit code {code}", exit_code=code))
            headers[EXIT_CODE_HEADER] = str(code)
            self._send(reply, out, headers)
        else:
            self._send(reply, out)

    async def _on_map(self, ep: Endpoint, msg: Any) -> None:
        """``fabric.core.<node>.map.<core>``: a job batch frame in, a job results frame out."""
        t0 = time.perf_counter_ns()
        reply = msg.reply
        try:
            pool = self._pool(msg.subject.rpartition(".")[2], caller_of(msg.subject))
            items = decode_job_batch(msg.data)
        except FabricError as exc:
            ep.record(t0, exc.message)
            self._send_error(reply, exc)
            return
        n = len(items)
        results: list[tuple[int, int, Any]] = [(0, 0, b"")] * n
        if not n:
            ep.record(t0)
            self._send(reply, encode_job_results(results))
            return
        left = [n]
        map_ep = ep

        def send(subject: str, data: bytes | None) -> None:
            if data is None:  # even the 413s of the jobs that do not fit do not fit (a huge batch)
                exc = TooLarge(f"core {pool.name!r}: the results of this batch of {n} jobs do not fit one "
                               f"reply of {self.reply_limit()} bytes; send smaller batches", core=pool.id)
                map_ep.record(t0, exc.message)
                self._send_error(subject, exc)
                return
            map_ep.record(t0)  # a batch is one request; its jobs' failures travel in the frame
            self._send(subject, data)

        def refuse(i: int, size: int, code: int, alone: bool) -> TooLarge:
            pool.output_refused(code)
            if alone:
                return self.too_large(pool, size, code, f"the output of job {i} of the batch")
            return TooLarge(f"core {pool.name!r}: the output of job {i} of the batch, {size} bytes, does not fit "
                            f"in what the outputs before it left of the reply's {self.reply_limit()} bytes; run it "
                            f"alone or in a smaller batch, or {OUTPUT_HINT}", core=pool.id, size=size)

        def collector(i: int) -> Callable[[int, Any, FabricError | None], None]:
            def done(code: int, out: Any, err: FabricError | None) -> None:
                if err is not None:
                    results[i] = (0, err.code, f"{err.kind}\n{err.message}".encode())
                else:
                    results[i] = (code, 0, out)
                left[0] -= 1
                if not left[0]:
                    send(reply, fit_results(results, self.reply_limit(), refuse))

            return done

        ids = self._job_ids
        for i, data in enumerate(items):
            pool.submit(Job(next(ids), data, collector(i)))


def fit_results(results: list[tuple[int, int, Any]], limit: int,
                refuse: Callable[[int, int, int, bool], FabricError]) -> bytes | None:
    """The job results frame of *results*, at most *limit* bytes; None when that cannot be done.

    When the whole frame does not fit, the outputs are kept in input order while they fit
    what is left; a job whose output does not gets the error ``refuse(index, size,
    exit_code, alone)`` in its slot (*alone*: it would not fit even by itself).  The
    errors of jobs that failed stay as they are.
    """
    frame = encode_job_results(results)
    if len(frame) <= limit:
        return frame
    left = limit - results_frame_size(len(results))
    fitted: list[tuple[int, int, Any]] = []
    for i, (code, err, out) in enumerate(results):
        size = len(out)
        if size <= left or err:  # a failed job's kind and message are short: they stay
            fitted.append((code, err, out))
            left -= size
            continue
        exc = refuse(i, size, code, size > limit - 24)
        text = f"{exc.kind}\n{exc.message}".encode()
        fitted.append((0, exc.code, text))
        left -= len(text)
    frame = encode_job_results(fitted)
    return frame if len(frame) <= limit else None


def _noop(code: int, out: Any, err: FabricError | None) -> None:
    """A placeholder ``done`` until the real one is bound."""
