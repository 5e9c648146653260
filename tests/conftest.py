"""Shared fixtures: a real nats-server per test session, an in-process allocator and spawner.

Resource accounting is checked in teardown (uvloop's _testbase habit): after every
test that uses the allocator, the arena holds exactly the blocks it held before
and passes a full consistency check.

Every fixture used by more than one module lives here, once.  A module that defines a
fixture of the same name does so on purpose (it says why next to it): its own server,
another scope, or other teardown checks.  Helpers that are not fixtures live in
``tests/_*.py``; no test module imports another (tests/test_layering.py checks).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import _nats
from tests._nats import SERVER_FIXTURES, NatsServer, connect, creds_for, realm, start_nats, trusted_config
from tests._spawner import all_ended, no_fds_leaked, open_fds

# the tests' clients are a client-role user of the session's servers, as a user of a fabric with auth on is:
# a FabricClient(url) without credentials= finds these (fabric.credentials.find_credentials)
_nats.use_client_credentials()

if TYPE_CHECKING:
    from collections.abc import Generator

    import nats

    from fabric import AsyncFabricClient
    from fabric.services.spawner import SpawnerService


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``unit`` may use no server fixture (checked before any fixture is set up)."""
    if item.get_closest_marker("unit") is None:
        return
    used = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if used:
        pytest.fail(f"{item.nodeid} is marked unit but uses the server fixtures {sorted(used)}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    """While a ``unit`` test runs (setup, call, teardown), start_nats refuses."""
    _nats.unit_test_running = item.nodeid if item.get_closest_marker("unit") is not None else None
    try:
        yield
    finally:
        _nats.unit_test_running = None


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture(scope="module")
def js_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream of the module's own: the node registry bucket's TTL is set by
    whoever creates it, so modules that check the registry (gpu-monitor, protocol doc) must not share one."""
    server = start_nats(tmp_path_factory.mktemp("nats-js"))
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    """A raw NATS connection to the session's server (raw requests as a non-Python client would send them),
    as the admin: plain subjects, a trusted caller."""
    conn = await connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests/_cores.py compiles cores and the C worker (cached by content, so once a session)."""
    return tmp_path_factory.mktemp("cores")


@pytest.fixture(scope="session")
async def allocator(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[object]:
    from fabric.service import ServiceSettings
    from fabric.services.allocator import AllocatorService

    state = tmp_path_factory.mktemp("state")
    node = f"test-{secrets.token_hex(3)}"
    svc = AllocatorService(ServiceSettings(credentials=creds_for(AllocatorService),
                                           nats_url=nats_url, node=node, state_dir=state), capacity=256 << 20)
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


@pytest.fixture(params=["data-plane", "nats"])
async def aclient(nats_url: str, allocator: object, request: pytest.FixtureRequest) -> AsyncIterator[object]:
    """A remote client (no local fast path), once over the allocator's data plane and once over NATS only."""
    from fabric import AsyncFabricClient

    async with AsyncFabricClient(nats_url, local=False, credentials=realm().client,
                                 data_plane=request.param == "data-plane") as fc:
        yield fc


@pytest.fixture(scope="module")
async def spawner(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SpawnerService]:
    """A real spawner in this process, one per test module."""
    from fabric.service import ServiceSettings
    from fabric.services.spawner import SpawnerService

    state = tmp_path_factory.mktemp("spawner-state")
    svc = SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), config=trusted_config(),
                                         nats_url=nats_url, node=f"sp-{secrets.token_hex(3)}", state_dir=state))
    await svc.start()
    yield svc
    await svc.stop()


@pytest.fixture
async def fc(nats_url: str, spawner: SpawnerService) -> AsyncIterator[AsyncFabricClient]:
    """A client of the module's spawner; teardown checks no process still runs and no descriptor leaked."""
    from fabric import AsyncFabricClient

    fds_before = open_fds()
    async with AsyncFabricClient(nats_url, local=False, credentials=realm().client) as client:
        yield client
    # teardown accounting: nothing of the test's processes still runs, no pipe or pidfd leaked
    await all_ended(spawner)
    await no_fds_leaked(fds_before)
