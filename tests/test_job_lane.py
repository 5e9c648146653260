"""The spawner's job lane and its NATS connections (issue 13), against real nats-servers.

A spawner holds exactly two NATS connections: the service kit's (``spawner@<node>``),
which the job lane subscribes on, and the publish-only reply link
(``spawner-replies@<node>``) that the pools' reader threads answer ``run`` jobs on.
The servers here are this module's own, started with a monitoring port (the
connections are read from ``/connz``) or with authentication on, as ``fabric up
--nats-url nats://user:pass@host:port`` (or ``nats://token@host:port``) gives it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from fabric import AsyncFabricClient
from fabric.service import ServiceSettings
from fabric.services.spawner import SpawnerService
from fabric.services.spawner.pool_reply import ReplyLink
from tests._cores import TEST_CORES, build_core
from tests._nats import NatsServer, creds_for, start_nats, trusted_config
from tests._wait import until_holds


@asynccontextmanager
async def spawner_on(url: str, state: Path) -> AsyncIterator[SpawnerService]:
    """A real spawner in this process on *url* (stopped, gracefully, on the way out)."""
    state.mkdir(parents=True, exist_ok=True)
    svc = SpawnerService(ServiceSettings(credentials=creds_for(SpawnerService), config=trusted_config(),
                                         nats_url=url, node=f"lane-{secrets.token_hex(3)}", state_dir=state))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def connection_names(server: NatsServer, node: str) -> list[str]:
    """The names of the server's client connections that belong to *node*, sorted."""
    assert server.monitor_port is not None

    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/connz?limit=4096", timeout=10) as r:
            return json.loads(r.read())

    connz = await asyncio.to_thread(get)
    return sorted(c.get("name", "") for c in connz.get("connections") or [] if c.get("name", "").endswith(f"@{node}"))


async def answered_through_the_link(svc: SpawnerService, url: str, so: Path) -> None:
    """A ``run`` job on *svc* is answered from the reply link, and a ``map`` through the kit's connection."""
    link = svc.cores.link
    assert link is not None and link.up, "the reply link should be up"
    async with AsyncFabricClient(url, local=False) as fc:
        core = await fc.load_core("echo", so, node=svc.node, min_workers=1, max_workers=1)
        try:
            before = link.published
            assert await core.run(b"through the link", timeout=15) == b"through the link"
            assert link.published == before + 1  # from the reader thread, not the loop
            assert await core.map([b"a", b"", b"bc"], timeout=15) == [b"a", b"", b"bc"]
            assert link.published == before + 1  # a batch's reply goes through the loop
        finally:
            await core.unload()


@pytest.fixture(scope="module")
def echo_so(build_dir: Path) -> Path:
    return build_core(TEST_CORES / "echo.c", build_dir)


async def test_a_spawner_holds_the_kits_connection_and_the_reply_link(tmp_path: Path, echo_so: Path) -> None:
    server = start_nats(tmp_path / "nats", monitor=True)
    try:
        async with spawner_on(server.url, tmp_path / "state") as svc:
            node = svc.node
            assert svc.cores.nc is svc.connection  # the lane subscribes on the kit's connection
            assert await connection_names(server, node) == [f"spawner-replies@{node}", f"spawner@{node}"]
            await answered_through_the_link(svc, server.url, echo_so)
            assert await connection_names(server, node) == [f"spawner-replies@{node}", f"spawner@{node}"]
        # stopped: both are closed (the kit drains its connection, the lane closes the link)
        await until_holds(lambda: connection_names(server, node), lambda names: names == [])
    finally:
        server.stop()


# credentials with a '%' in them: nats-py presents them as written (no percent-decoding), and
# so must the link, or it would be refused where the service's own connection is let in
AUTH = {
    "user-password": {"user": "fabric", "password": "pa%41ss"},
    "token": {"token": "t0ken%41"},
}


@pytest.mark.parametrize("auth", list(AUTH))
async def test_run_is_answered_through_the_link_with_auth_on(tmp_path: Path, echo_so: Path, auth: str) -> None:
    server = start_nats(tmp_path / "nats", **AUTH[auth])
    try:
        assert "@" in server.url  # the credentials travel in the URL, as with fabric up --nats-url
        async with spawner_on(server.url, tmp_path / "state") as svc:
            await answered_through_the_link(svc, server.url, echo_so)
    finally:
        server.stop()


async def test_the_link_gives_up_on_credentials_the_server_refuses(tmp_path: Path) -> None:
    """Refused credentials do not change by retrying: the link stays down for good (the loop serves)."""
    import structlog

    server = start_nats(tmp_path / "nats", jetstream=False, user="fabric", password="right")
    try:
        wrong = server.url.replace("fabric:right@", "fabric:wrong@")
        link = ReplyLink(wrong, "spawner-replies@test", structlog.get_logger())
        assert await asyncio.to_thread(link.connect) is False
        assert not link.up and not link.usable  # tend_link() tries no more
        right = ReplyLink(server.url, "spawner-replies@test", structlog.get_logger())
        try:
            assert await asyncio.to_thread(right.connect) is True and right.up
        finally:
            right.close()
    finally:
        server.stop()
