"""The gateway's pieces that need no fabric: the door (tokens, scopes, rate limits), webhook signing, SSE bounds.

The whole gateway runs in tests/test_gateway.py against a real fabric; these pin the
rules whose every case a live fabric would make slow to reach: a gateway listening
beyond loopback lets nothing in without a token, a client that stops reading an event
stream is dropped at its queue's bound, a webhook's signature is HMAC-SHA256 over
``<timestamp>.<body>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

import msgspec
import pytest

from fabric.config.model import GatewayConfig
from fabric.errors import RateLimited, Unauthenticated
from fabric.gateway_tokens import TokenError, TokenRecord, TokenTable, check_scopes, new_token, token_hash

pytestmark = pytest.mark.unit

gateway = pytest.importorskip("fabric.services.gateway.access")
from fabric.services.gateway.access import Access, RateLimiter, is_loopback_host  # noqa: E402
from fabric.services.gateway.events import _END, _Client  # noqa: E402
from fabric.services.gateway.webhooks import refused, sign  # noqa: E402


def table_with(token: str, scopes: list[str], user: str = "alice") -> TokenTable:
    table = TokenTable()
    rec = TokenRecord(name="t1", sha256=token_hash(token), scopes=scopes, user=user)
    table.apply("token.t1", msgspec.json.encode(rec))
    table.loaded = True
    return table


def test_anonymous_gets_the_loopback_scopes_on_loopback_only() -> None:
    assert Access(TokenTable(), GatewayConfig()).anonymous.scopes == frozenset({"read"})
    for host in ("0.0.0.0", "192.0.2.7", "::"):
        door = Access(TokenTable(), GatewayConfig(http_host=host))
        assert not door.loopback_only and door.anonymous.scopes == frozenset()
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("example.com")


def test_tokens_scopes_and_their_errors() -> None:
    token = new_token()
    assert token.startswith("fbt_") and len(token) == 47
    door = Access(table_with(token, ["read"]), GatewayConfig())
    caller = door.identify(token)
    assert caller.user == "alice" and caller.allows("read") and not caller.allows("submit") and caller.sees_tasks
    with pytest.raises(Unauthenticated):
        door.identify("fbt_" + "x" * 43)  # unknown: 401 even on loopback
    with pytest.raises(Unauthenticated):
        door.identify("Bearer-ish")
    admin = Access(table_with(token, ["admin"], user=""), GatewayConfig()).identify(token)
    assert admin.user is None and admin.allows("submit") and admin.allows("read")
    anonymous = door.identify(None)
    assert anonymous.anonymous and not anonymous.sees_tasks
    # removed: the watch applies the delete and the token stops working
    door.tokens.apply("token.t1", None)
    with pytest.raises(Unauthenticated):
        door.identify(token)
    assert check_scopes(["read", " Submit", "read"]) == ["read", "submit"]
    with pytest.raises(TokenError):
        check_scopes(["root"])
    with pytest.raises(TokenError):
        check_scopes([])


def test_rate_limiter_buckets() -> None:
    limiter = RateLimiter(rate=10.0, burst=3)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("a")
    assert 0 < wait <= 0.1
    assert limiter.take("b") == 0.0  # another key has its own bucket
    assert issubclass(RateLimited, Exception) and RateLimited("x").code == 429


async def test_an_event_client_that_stops_reading_is_dropped_at_its_bound() -> None:
    client = _Client(16)
    for i in range(16):
        client.put(i)
    assert not client.dropped
    client.put(16)  # the 17th: over the bound
    assert client.dropped and client.queue.qsize() == 2  # the last word and the end, nothing else kept
    last = client.queue.get_nowait()
    assert last.event == "dropped" and "16 events behind" in json.loads(last.data)["reason"]
    assert client.queue.get_nowait() is _END
    for i in range(100):
        client.put(i)  # a dropped client takes nothing more
    assert client.queue.qsize() == 0
    await asyncio.sleep(0)


def test_webhook_signature_and_refused_urls() -> None:
    body = b'{"id":"t"}'
    assert sign(b"k", "1700000000", body) == "sha256=" + hmac.new(b"k", b"1700000000." + body,
                                                                    hashlib.sha256).hexdigest()
    assert refused("http://127.0.0.1:9000/done") == "" and refused("https://hooks.example.com/x") == ""
    assert "link-local" in refused("http://169.254.169.254/latest/meta-data")
    assert "link-local" in refused("http://[fe80::1]/")
    assert refused("ftp://example.com/") and refused("not a url") and refused("http:///nohost")


def test_the_gateway_port_is_kept_from_start_to_start(tmp_path: Any) -> None:
    import os
    import socket

    from fabric.gateway_addr import GatewayPortInUse, resolve
    from fabric.state import StateDir

    state = StateDir(tmp_path / "s")
    saved = {k: os.environ.get(k) for k in ("FABRIC_GATEWAY_HTTP_HOST", "FABRIC_GATEWAY_HTTP_PORT")}
    try:
        first = resolve(state, "127.0.0.1", 0)
        port = int(first.rsplit(":", 1)[1])
        assert resolve(state, "127.0.0.1", 0) == first and os.environ["FABRIC_GATEWAY_HTTP_PORT"] == str(port)
        with socket.socket() as taken:  # another program took it meanwhile: a new free one, kept from now on
            taken.bind(("127.0.0.1", port))
            taken.listen(1)
            moved = resolve(state, "127.0.0.1", 0)
            assert moved != first and (tmp_path / "s" / "gateway.port").read_text().strip() == moved.rsplit(":")[-1]
            with pytest.raises(GatewayPortInUse):  # a port given explicitly is never changed behind one's back
                resolve(state, "127.0.0.1", port)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
