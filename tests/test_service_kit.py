"""The service kit on a real nats-server: dispatch, concurrency bound, errors, stats, drain."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys

import msgspec
import nats
import pytest

from fabric.errors import Conflict
from fabric.service import Endpoint, FabricService, Request, ServiceSettings
from tests._nats import creds_for


class Echo(msgspec.Struct):
    text: str
    delay_s: float = 0.0


class KitService(FabricService):
    name = "kit-test"
    description = "service kit test double: a real service on the real bus"

    def endpoints(self):
        p = f"kit.{self.node}"
        return [
            Endpoint("slow", f"{p}.slow", self.slow),
            Endpoint("fast", f"{p}.fast", self.fast),
            Endpoint("boom", f"{p}.boom", self.boom),
        ]

    running = 0
    most_running = 0

    async def slow(self, req: Request) -> Echo:
        msg = req.decode(Echo)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(msg.delay_s)
        finally:
            self.running -= 1
        return msg

    def fast(self, req: Request) -> Echo:
        msg = req.decode(Echo)
        if msg.text == "conflict":
            raise Conflict("that conflicts")
        return msg

    def boom(self, req: Request) -> None:
        raise ZeroDivisionError("a bug")


@pytest.fixture
async def kit(nats_url, tmp_path):
    svc = KitService(ServiceSettings(credentials=creds_for(KitService),
                                     nats_url=nats_url, node=f"k{secrets.token_hex(3)}", state_dir=tmp_path,
                                     max_concurrency=4))
    await svc.start()
    yield svc
    await svc.stop()


@pytest.mark.unit
def test_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="node"):
        ServiceSettings(nats_url="nats://x:1", node="bad node", state_dir=tmp_path)
    with pytest.raises(ValueError, match="URL"):
        ServiceSettings(nats_url="http://x", node="n", state_dir=tmp_path)
    with pytest.raises(ValueError, match="max_concurrency"):
        ServiceSettings(nats_url="nats://x:1", node="n", state_dir=tmp_path, max_concurrency=0)


async def test_coroutine_handlers_run_concurrently(kit, nc):
    body = json.dumps({"text": "zz", "delay_s": 0.5}).encode()
    replies = await asyncio.gather(*(nc.request(f"kit.{kit.node}.slow", body, timeout=10) for _ in range(3)))
    assert all(json.loads(r.data)["text"] == "zz" for r in replies)
    # nats-py alone would run them one after another; the kit overlaps them
    assert kit.most_running == 3


async def test_concurrency_bound_applies_backpressure(kit, nc):
    body = json.dumps({"text": "b", "delay_s": 0.3}).encode()
    replies = await asyncio.gather(*(nc.request(f"kit.{kit.node}.slow", body, timeout=10) for _ in range(10)))
    assert len(replies) == 10 and all(json.loads(r.data)["text"] == "b" for r in replies)
    assert kit.most_running == 4, "the bound (max_concurrency=4) was not applied"


async def test_inline_handler_and_encodings(kit, nc):
    r = await nc.request(f"kit.{kit.node}.fast", b'{"text": "hi"}', timeout=5)
    assert json.loads(r.data) == {"text": "hi", "delay_s": 0.0} and not r.headers
    r = await nc.request(f"kit.{kit.node}.fast", msgspec.msgpack.encode({"text": "mp"}),
                         headers={"Content-Type": "application/msgpack"}, timeout=5)
    assert r.headers["Content-Type"] == "application/msgpack"
    assert msgspec.msgpack.decode(r.data)["text"] == "mp"


async def test_errors_become_adr32_headers_and_service_keeps_serving(kit, nc):
    r = await nc.request(f"kit.{kit.node}.fast", b'{"text": "conflict"}', timeout=5)
    assert r.headers["Nats-Service-Error-Code"] == "409" and r.headers["Fabric-Error"] == "conflict"
    r = await nc.request(f"kit.{kit.node}.fast", b'{"text": 5}', timeout=5)
    assert r.headers["Nats-Service-Error-Code"] == "400"
    assert "Expected `str`" in r.headers["Nats-Service-Error"]
    r = await nc.request(f"kit.{kit.node}.boom", b"", timeout=5)
    assert r.headers["Nats-Service-Error-Code"] == "500"
    assert "ZeroDivisionError" in r.headers["Nats-Service-Error"]
    r = await nc.request(f"kit.{kit.node}.fast", b'{"text": "still here"}', timeout=5)
    assert json.loads(r.data)["text"] == "still here"


async def test_stats_count_real_work(kit, nc):
    await nc.request(f"kit.{kit.node}.slow", b'{"text": "s", "delay_s": 0.2}', timeout=5)
    await nc.request(f"kit.{kit.node}.boom", b"", timeout=5)
    ping = json.loads((await nc.request("$SRV.PING.kit-test", b"", timeout=2)).data)
    stats = json.loads((await nc.request(f"$SRV.STATS.kit-test.{ping['id']}", b"", timeout=2)).data)
    eps = {e["name"]: e for e in stats["endpoints"]}
    assert eps["slow"]["num_requests"] == 1 and eps["slow"]["processing_time"] >= 0.2e9
    assert eps["boom"]["num_errors"] == 1 and "ZeroDivisionError" in eps["boom"]["last_error"]
    info = json.loads((await nc.request(f"$SRV.INFO.kit-test.{ping['id']}", b"", timeout=2)).data)
    assert info["description"] and info["metadata"]["node"] == kit.node


async def test_stop_drains_in_flight_requests(nats_url, tmp_path, nc):
    svc = KitService(ServiceSettings(credentials=creds_for(KitService),
                                     nats_url=nats_url, node=f"d{secrets.token_hex(3)}", state_dir=tmp_path))
    await svc.start()
    # precondition: this connection reaches the new service (one full round trip)
    assert json.loads((await nc.request(f"kit.{svc.node}.fast", b'{"text": "up"}', timeout=5)).data)["text"] == "up"
    pending = asyncio.ensure_future(
        nc.request(f"kit.{svc.node}.slow", b'{"text": "late", "delay_s": 0.5}', timeout=5))
    for _ in range(500):  # until the handler runs: the request is then in flight
        if svc.running or pending.done():
            break
        await asyncio.sleep(0.01)
    assert svc.running == 1, f"request not in flight: {pending.exception() if pending.done() else 'pending'}"
    await svc.stop()  # must wait for the request in flight and still answer it
    r = await pending
    assert json.loads(r.data)["text"] == "late"
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(f"kit.{svc.node}.fast", b'{"text": "x"}', timeout=1)


@pytest.mark.unit
def test_tune_malloc_applies_on_glibc_and_yields_to_the_environment(monkeypatch):
    import platform

    from fabric.service import tune_malloc

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert tune_malloc() is False


@pytest.mark.unit
def test_tune_gc_freezes_and_raises_the_first_threshold_and_yields_to_the_environment():
    """In a fresh interpreter each time: tune_gc changes the process's collector for good."""
    probe = ("import gc, sys; from fabric.service import tune_gc; applied = tune_gc(); "
             "print(applied, gc.get_threshold()[0], gc.get_freeze_count() > 0)")
    env = {k: v for k, v in os.environ.items() if k != "FABRIC_GC_GEN0"}

    def run(**extra: str) -> str:
        return subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True,
                              text=True, timeout=60, check=True).stdout.split()

    assert run() == ["True", "20000", "True"]
    assert run(FABRIC_GC_GEN0="5000") == ["True", "5000", "True"]
    assert run(FABRIC_GC_GEN0="0") == ["False", "700", "False"]  # CPython's default kept
    assert run(FABRIC_GC_GEN0="lots") == ["False", "700", "False"]


async def test_unknown_content_type_is_refused_naming_the_accepted_ones(kit, nc):
    """Decoding an unknown type as JSON would answer a misleading error -- or succeed on a lucky body."""
    for ctype in ("text/plain", "application/cbor", "application/x-www-form-urlencoded"):
        r = await nc.request(f"kit.{kit.node}.fast", b'{"text": "hi"}', headers={"Content-Type": ctype}, timeout=5)
        assert r.headers["Nats-Service-Error-Code"] == "400" and r.headers["Fabric-Error"] == "bad_request"
        text = r.headers["Nats-Service-Error"]
        assert ctype in text and "application/json" in text and "application/msgpack" in text, text
        assert "application/x-fabric-frame" in text, text
        assert json.loads(r.data)["error"]["message"] == text
    # the known ones, with parameters and in any case, still work
    r = await nc.request(f"kit.{kit.node}.fast", b'{"text": "cs"}',
                         headers={"Content-Type": "Application/JSON; charset=utf-8"}, timeout=5)
    assert json.loads(r.data)["text"] == "cs" and not r.headers
    r = await nc.request(f"kit.{kit.node}.fast", msgspec.msgpack.encode({"text": "mp"}),
                         headers={"Content-Type": "application/msgpack; v=1"}, timeout=5)
    assert msgspec.msgpack.decode(r.data)["text"] == "mp"


async def test_a_frame_to_an_endpoint_without_frames_says_so(kit, nc):
    for headers in (None, {"Content-Type": "application/x-fabric-frame"}):
        r = await nc.request(f"kit.{kit.node}.fast", b"FBF1\x01\x00\x00\x00" + bytes(16), headers=headers, timeout=5)
        assert r.headers["Nats-Service-Error-Code"] == "400" and r.headers["Fabric-Error"] == "bad_request"
        text = r.headers["Nats-Service-Error"]
        assert "takes no binary frames" in text and f"kit.{kit.node}.fast" in text, text
        assert "malformed JSON" not in text
    # an endpoint that declares frames gets them
    ep = Endpoint("framed", "x.framed", lambda req: req.is_frame, frames=True)
    assert ep.frames and not Endpoint("plain", "x.plain", lambda req: None).frames


class _LogRecorder:
    """Stands in for the structlog logger: keeps (level, event, fields) of every call."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **fields: self.events.append((level, event, fields))


class LoopService(KitService):
    """KitService with two background loops: one that ticks, one that crashes at once."""

    name = "kit-loops"

    ticks = 0
    ticker_running_after_request: bool | None = None
    at_on_stop: tuple[bool, bool, int] | None = None

    async def on_start(self) -> None:
        self.ticker = self.background(self._tick, name="ticker")
        self.crasher = self.background(self._crash, name="crash")

    async def _tick(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0.01)

    async def _crash(self) -> None:
        raise RuntimeError("a bug in a loop")

    async def slow(self, req: Request) -> Echo:
        reply = await super().slow(req)
        self.ticker_running_after_request = not self.ticker.done()
        return reply

    async def on_stop(self) -> None:
        self.at_on_stop = (self.ticker.done(), self.ticker.cancelled(), len(self.tasks))


async def test_background_tasks_log_failures_and_end_after_requests_before_on_stop(nats_url, tmp_path, nc):
    from tests._wait import until

    svc = LoopService(ServiceSettings(credentials=creds_for(LoopService),
                                      nats_url=nats_url, node=f"b{secrets.token_hex(3)}", state_dir=tmp_path))
    svc.tasks.log = log = _LogRecorder()
    await svc.start()
    assert await until(lambda: asyncio.sleep(0, svc.ticks > 1 and svc.crasher.done()))
    # the crash is logged with the task's name, and the other loop goes on
    assert [(lvl, ev, f["task"]) for lvl, ev, f in log.events] == [
        ("error", "background task failed", "kit-loops:crash")]
    assert isinstance(log.events[0][2]["exc_info"], RuntimeError) and not svc.ticker.done()
    pending = asyncio.ensure_future(
        nc.request(f"kit.{svc.node}.slow", b'{"text": "late", "delay_s": 0.3}', timeout=5))
    assert await until(lambda: asyncio.sleep(0, svc.running == 1 or pending.done()))
    await svc.stop()
    assert json.loads((await pending).data)["text"] == "late"
    # the loop ran while the request in flight finished, and had ended (cancelled, awaited) before on_stop
    assert svc.ticker_running_after_request is True
    assert svc.at_on_stop == (True, True, 0)


@pytest.mark.unit
def test_endpoint_helpers_spell_the_contract_subjects(tmp_path):
    from fabric.service import cluster_endpoint, node_endpoint

    def handler(req: Request) -> None:
        return None

    ep = node_endpoint("mem", "n1", "read", handler, frames=True)
    assert (ep.name, ep.subject, ep.queue_group, ep.frames) == ("read", "fabric.mem.n1.read", "fabric", True)
    ep = node_endpoint("core", "n1", "run", handler, name="core-run", wildcard=True)
    assert (ep.name, ep.subject, ep.frames) == ("core-run", "fabric.core.n1.run.*", False)
    ep = cluster_endpoint("mem", "alloc", handler, name="alloc-any")
    assert (ep.name, ep.subject, ep.queue_group) == ("alloc-any", "fabric.mem.alloc", "fabric")
    svc = KitService(ServiceSettings(credentials=creds_for(KitService),
                                     nats_url="nats://x:1", node="n2", state_dir=tmp_path))
    assert svc.node_endpoint("proc", "kill", handler).subject == "fabric.proc.n2.kill"
    assert svc.cluster_endpoint("nodes", "list", handler).subject == "fabric.nodes.list"


@pytest.mark.unit
def test_service_connections_reconnect_forever_and_log_their_events():
    from fabric.service_nats import connect_options

    reconnects: list[int] = []
    log = _LogRecorder()
    opts = connect_options("svc@n1", log, on_reconnect=lambda: reconnects.append(1))
    assert opts["name"] == "svc@n1" and opts["max_reconnect_attempts"] == -1 and opts["reconnect_time_wait"] > 0

    async def events() -> None:
        await opts["error_cb"](OSError("boom"))
        await opts["disconnected_cb"]()
        await opts["reconnected_cb"]()

    asyncio.run(events())
    assert [(lvl, ev, f["connection"]) for lvl, ev, f in log.events] == [
        ("warning", "nats error", "svc@n1"), ("warning", "disconnected from NATS", "svc@n1"),
        ("info", "reconnected to NATS", "svc@n1")]
    assert reconnects == [1]


async def test_a_publish_without_reply_is_served_and_not_answered(kit, nc):
    kit.log = log = _LogRecorder()
    await nc.publish(f"kit.{kit.node}.fast", b'{"text": "fire and forget"}')
    r = await nc.request(f"kit.{kit.node}.fast", b'{"text": "after"}', timeout=5)
    assert json.loads(r.data)["text"] == "after"
    ping = json.loads((await nc.request("$SRV.PING.kit-test", b"", timeout=2)).data)
    stats = json.loads((await nc.request(f"$SRV.STATS.kit-test.{ping['id']}", b"", timeout=2)).data)
    assert {e["name"]: e["num_requests"] for e in stats["endpoints"]}["fast"] == 2
    assert [ev for _, ev, _ in log.events if ev == "reply not sent"] == []


async def test_a_stop_ends_even_when_a_background_loop_will_not(nats_url, tmp_path):
    """Each step of a stop gets at most drain_timeout_s: a loop that swallows its cancellation cannot hang it."""
    svc = KitService(ServiceSettings(credentials=creds_for(KitService),
                                     nats_url=nats_url, node=f"k{secrets.token_hex(3)}", state_dir=tmp_path,
                                     drain_timeout_s=1.0))
    await svc.start()
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                pass  # a bug: it ignores its cancellation

    svc.background(stubborn, name="stubborn")
    try:
        await asyncio.wait_for(svc.stop(), 15)  # before the bound: it never returned
    finally:
        release.set()
        await asyncio.sleep(0.3)  # the loop ends itself now


async def test_a_start_that_fails_half_way_releases_what_it_made(nats_url, tmp_path):
    """serve_forever: a start that fails after connecting (a port taken, say) stops the service before it raises,
    so the process exits with the error instead of hanging on its connection and loops."""

    class FailsAtStart(KitService):
        async def on_start(self) -> None:
            self.background(lambda: asyncio.sleep(3600), name="a-loop")
            raise OSError(98, "Address already in use")

    svc = FailsAtStart(ServiceSettings(credentials=creds_for(KitService), nats_url=nats_url,
                                       node=f"k{secrets.token_hex(3)}", state_dir=tmp_path))
    with pytest.raises(OSError, match="Address already in use"):
        await asyncio.wait_for(svc.serve_forever(), 30)
    assert svc.nc is not None and svc.nc.is_closed, "the connection was left open"
    assert not [t for t in asyncio.all_tasks() if t.get_name().endswith("a-loop") and not t.done()]
