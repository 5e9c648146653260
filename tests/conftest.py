"""Shared fixtures: a real nats-server per test session, an in-process allocator and spawner.

Resource accounting is checked in teardown (uvloop's _testbase habit): after every
test that uses the allocator, the arena holds exactly the blocks it held before
and passes a full consistency check.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

from tests._nats import NatsServer, start_nats
from tests._spawner import all_ended, no_fds_leaked, open_fds

if TYPE_CHECKING:
    from fabric import AsyncFabricClient
    from services.spawner import SpawnerService


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
async def allocator(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[object]:
    from fabric.service import ServiceSettings
    from services.allocator import AllocatorService

    state = tmp_path_factory.mktemp("state")
    node = f"test-{secrets.token_hex(3)}"
    svc = AllocatorService(ServiceSettings(nats_url=nats_url, node=node, state_dir=state), capacity=256 << 20)
    await svc.start()
    yield svc
    await svc.stop()
    # close() kept the segments for a restart; the tests are done with them
    from fabric_ext.arena import Arena

    Arena(svc.prefix, svc.capacity).destroy()


@pytest.fixture
async def mem_accounting(allocator: object) -> AsyncIterator[object]:
    """Checks in teardown that the test freed every block it allocated."""
    arena = allocator.arena  # type: ignore[attr-defined]
    before = arena.stats()["blocks"]
    yield allocator
    arena.check()
    assert arena.stats()["blocks"] == before, "test leaked blocks in the arena"


@pytest.fixture
async def aclient(nats_url: str, allocator: object) -> AsyncIterator[object]:
    from fabric import AsyncFabricClient

    async with AsyncFabricClient(nats_url, local=False) as fc:
        yield fc


@pytest.fixture(scope="module")
async def spawner(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SpawnerService]:
    """A real spawner in this process, one per test module."""
    from fabric.service import ServiceSettings
    from services.spawner import SpawnerService

    state = tmp_path_factory.mktemp("spawner-state")
    svc = SpawnerService(ServiceSettings(nats_url=nats_url, node=f"sp-{secrets.token_hex(3)}", state_dir=state))
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def fc(nats_url: str, spawner: SpawnerService) -> AsyncIterator[AsyncFabricClient]:
    """A client of the module's spawner; teardown checks no process still runs and no descriptor leaked."""
    from fabric import AsyncFabricClient

    fds_before = open_fds()
    async with AsyncFabricClient(nats_url, local=False) as client:
        yield client
    # teardown accounting: nothing of the test's processes still runs, no pipe or pidfd leaked
    await all_ended(spawner)
    await no_fds_leaked(fds_before)
