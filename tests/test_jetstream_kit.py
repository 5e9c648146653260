"""The service kit keeps a service's JetStream resources in existence (fabric/jetstream.py).

Every test runs a real nats-server; "a restart" is a kill -9 and a new server on the
same port and store directory, which is what the supervisor does under ``fabric up``:
file-backed streams come back from disk, memory-backed ones do not, and the kit must
recreate them and hand the service a fresh context.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError

from fabric.jetstream import Consumer, JetStreamResource, KeyValueBucket, Stream
from fabric.service import Endpoint, FabricService, Request, ServiceSettings
from tests._nats import NatsServer, connect, creds_for, start_nats
from tests._wait import until_back as until

BUCKET = "kit_live"


class Keeper(FabricService):
    """A real service that declares one resource of each kind."""

    name = "js-kit-test"
    description = "service kit test double: JetStream resources kept across restarts"

    def __init__(self, settings: ServiceSettings, ttl_s: float = 5.0) -> None:
        super().__init__(settings)
        self.ttl_s = ttl_s
        self.contexts: list[JetStreamContext | None] = []

    def jetstream_resources(self) -> list[JetStreamResource]:
        return [
            KeyValueBucket(KeyValueConfig(bucket=BUCKET, history=1, ttl=self.ttl_s, storage=StorageType.MEMORY)),
            Stream(StreamConfig(name="KIT_EVENTS", subjects=["kit.events.>"], storage=StorageType.FILE)),
            Consumer("KIT_EVENTS", ConsumerConfig(durable_name="kit_worker", ack_policy="explicit")),
        ]

    async def on_jetstream(self, js: JetStreamContext | None) -> None:
        self.contexts.append(js)

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("ping", f"kit.{self.node}.ping", self.ping)]

    def ping(self, req: Request) -> bytes:
        from fabric.service import Reply

        return Reply(b"pong")  # type: ignore[return-value]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    srv = start_nats(tmp_path / "nats")
    yield srv
    srv.stop()


@pytest.fixture
async def keeper(server: NatsServer, tmp_path: Path) -> AsyncIterator[Keeper]:
    svc = Keeper(ServiceSettings(credentials=creds_for(Keeper),
                                 nats_url=server.url, node=f"k{secrets.token_hex(3)}", state_dir=tmp_path))
    await svc.start()
    yield svc
    await svc.stop()


async def bucket_exists(url: str) -> bool:
    nc = await connect(url)
    try:
        await nc.jetstream().key_value(BUCKET)
        return True
    except BucketNotFoundError:
        return False
    finally:
        await nc.close()


def restart(server: NatsServer) -> None:
    """kill -9, then a new server on the same port and store (the fixture stops whichever runs last)."""
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server.proc = start_nats(server.workdir, port=server.port).proc


async def test_resources_exist_before_the_service_starts_serving(keeper: Keeper, server: NatsServer) -> None:
    assert keeper.contexts and keeper.contexts[0] is not None
    assert keeper.jetstream is not None and keeper.jetstream.available is True
    nc = await connect(server.url)
    try:
        js = nc.jetstream()
        assert (await (await js.key_value(BUCKET)).status()).ttl == 5.0
        assert (await js.stream_info("KIT_EVENTS")).config.storage == StorageType.FILE
        assert (await js.consumer_info("KIT_EVENTS", "kit_worker")).config.durable_name == "kit_worker"
    finally:
        await nc.close()


async def test_a_restarted_nats_server_gets_the_memory_bucket_back(keeper: Keeper, server: NatsServer) -> None:
    calls = len(keeper.contexts)
    restart(server)
    # the memory-backed bucket was lost with the server; the kit recreates it on reconnect
    assert await until(lambda: bucket_exists(server.url)), "the KV bucket never came back"
    assert await until(lambda: _true(len(keeper.contexts) > calls))
    js = keeper.contexts[-1]
    assert js is not None
    kv = await js.key_value(BUCKET)
    await kv.put("k", b"v")  # the fresh context works against the new server
    assert (await kv.get("k")).value == b"v"
    # the file-backed stream and its durable consumer survived on disk
    assert (await js.consumer_info("KIT_EVENTS", "kit_worker")).name == "kit_worker"


async def test_a_resource_reported_lost_is_recreated(keeper: Keeper, server: NatsServer) -> None:
    nc = await connect(server.url)
    try:
        await nc.jetstream().delete_key_value(BUCKET)
        assert not await bucket_exists(server.url)
        keeper.jetstream_lost()
        assert await until(lambda: bucket_exists(server.url))
    finally:
        await nc.close()


async def test_an_existing_bucket_keeps_its_own_limits(server: NatsServer, tmp_path: Path) -> None:
    nc = await connect(server.url)
    try:
        await nc.jetstream().create_key_value(KeyValueConfig(bucket=BUCKET, history=1, ttl=9.0,
                                                             storage=StorageType.MEMORY))
        svc = Keeper(ServiceSettings(credentials=creds_for(Keeper),
                                     nats_url=server.url, node=f"k{secrets.token_hex(3)}", state_dir=tmp_path))
        await svc.start()
        try:
            assert svc.jetstream is not None and svc.jetstream.available is True
            assert (await (await nc.jetstream().key_value(BUCKET)).status()).ttl == 9.0  # another node's choice
        finally:
            await svc.stop()
    finally:
        await nc.close()


async def test_without_jetstream_the_service_runs_and_is_told_so(tmp_path: Path) -> None:
    plain = start_nats(tmp_path / "plain", jetstream=False)
    try:
        svc = Keeper(ServiceSettings(credentials=creds_for(Keeper),
                                     nats_url=plain.url, node=f"k{secrets.token_hex(3)}", state_dir=tmp_path))
        await svc.start()
        try:
            assert svc.contexts == [None]
            assert svc.jetstream is not None and svc.jetstream.available is False
            nc = await connect(plain.url)
            try:
                assert (await nc.request(f"kit.{svc.node}.ping", b"", timeout=5)).data == b"pong"
            finally:
                await nc.close()
        finally:
            await svc.stop()
    finally:
        plain.stop()


async def _true(value: bool) -> bool:
    return value


async def test_kv_snapshot_reads_every_key_even_when_the_end_marker_comes_first(js_server: NatsServer) -> None:
    # nats-py can put its "initial values done" marker before the values (its consumer-info answer racing its own
    # callback): here the marker is put at the head of a real watcher's queue, the race's outcome made certain
    from fabric.jetstream import kv_snapshot

    nc = await connect(js_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket=f"snap_{secrets.token_hex(3)}"))
        assert await kv_snapshot(kv) == []  # empty: answered at once
        for i in range(50):
            await kv.put(f"k{i}", str(i).encode())
        await kv.delete("k7")
        real_watchall = kv.watchall

        async def early_marker(**kw: object) -> object:
            watcher = await real_watchall(**kw)
            watcher._updates._queue.appendleft(None)  # what nats-py does when the race goes the other way
            return watcher

        kv.watchall = early_marker  # type: ignore[method-assign]
        naive = await kv.watchall()
        assert await naive.updates(timeout=5) is None  # a reader stopping here would see an empty bucket
        await naive.stop()
        got = await kv_snapshot(kv)
        assert sorted(e.key for e in got) == sorted(f"k{i}" for i in range(50))
        assert next(e for e in got if e.key == "k7").operation == "DEL"
        assert {e.key: e.value for e in got if e.key != "k7"} == {f"k{i}": str(i).encode() for i in range(50) if i != 7}
    finally:
        await nc.close()
