"""Connecting: where a client goes without a URL, and how it fails when nothing is there.

A client that cannot reach NATS must say so within its timeout (``Unavailable``), not
wait forever: nats-py applies "reconnect forever" to the first connect too.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from fabric import AsyncFabricClient, FabricClient, Unavailable
from fabric.client import DEFAULT_NATS_URL, default_url


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


@pytest.mark.unit
def test_sync_client_gives_up_within_its_timeout() -> None:
    url = f"nats://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as info:
        with FabricClient(url, timeout=1.0):
            pass
    assert time.monotonic() - t0 < 10, "the first connect must be bounded by the client's timeout"
    assert url in str(info.value) and "fabric up" in str(info.value)


@pytest.mark.unit
async def test_async_client_gives_up_within_its_timeout() -> None:
    url = f"nats://127.0.0.1:{_closed_port()}"
    with pytest.raises(Unavailable, match="nothing answers there"):
        async with AsyncFabricClient(url, timeout=1.0):
            pass


async def test_connects_when_the_server_is_there(nats_url: str) -> None:
    async with AsyncFabricClient(nats_url, timeout=5.0) as fc:
        assert fc.nc is not None and fc.nc.is_connected


async def test_closing_is_not_reported_as_a_lost_connection(nats_url: str, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="fabric.client")
    async with AsyncFabricClient(nats_url, timeout=2) as fc:
        assert fc.nc is not None and fc.nc.is_connected
    assert not [r for r in caplog.records if "disconnected" in r.getMessage()], caplog.text


@pytest.mark.unit
def test_default_url_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_NATS_URL", "nats://10.1.2.3:4999")
    assert default_url() == "nats://10.1.2.3:4999"
    assert AsyncFabricClient().url == "nats://10.1.2.3:4999"


@pytest.mark.unit
def test_default_url_without_a_running_fabric(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FABRIC_NATS_URL", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))  # an empty default state dir
    assert default_url() == DEFAULT_NATS_URL
