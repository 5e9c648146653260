"""Hostile input at scale: generated requests to every endpoint of every service (hypothesis).

A one-node fabric runs in this process on a real, secured nats-server: allocator,
spawner, gpu-monitor and scheduler.  The endpoints are not listed here: they are read
from the services' ``$SRV.INFO``, so a new endpoint is covered by itself.  To each,
hypothesis sends bodies of every shape -- random bytes, frames with the magic and
garbage after it, JSON and MessagePack documents built from the contract's real field
names with values of the wrong type and size, empty bodies, unknown ``Content-Type``s
-- in the plain form (a trusted caller) and in a user's form.  Each answer must come
within the timeout and be a success or a 4xx; never a 500 (a crash the kit caught).
Refusals that are about capacity, not about the request, are allowed and named:
507 (the arena is full: generated allocations are never freed) and 503 (a resource
the request named is busy or gone).  The fabric must still serve a normal request
afterwards.

Bounded: ``HOSTILE_EXAMPLES`` examples per endpoint (CI: the default), no deadline per
example, one timeout per request.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.protocol.permissions import user_subject
from fabric.protocol.wire import MAGIC
from fabric.schema import CONTENT_TYPE_HEADER
from tests._nats import NatsServer, connect, creds_for, realm
from tests._tasks import one_node_fabric

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "60"))
TIMEOUT_S = 10.0
#: answers that refuse for capacity, not for the request (see the module docstring)
CAPACITY = {"503", "507"}

# the contract's field names, so generated documents reach past "unknown field" into the handlers
FIELDS = ["size", "owner", "ttl_s", "handle", "offset", "length", "data", "items", "argv", "env", "cwd", "stdin",
          "limits", "sandbox", "stream_to", "wait_s", "id", "signal", "timeout_s", "eof", "name", "code", "path",
          "min_workers", "max_workers", "kind", "type", "payload", "core", "exec", "priority", "resources",
          "requirements", "retries", "key", "deps", "notify", "fn", "calls", "prefix", "state", "limit", "node",
          "cpus", "mem", "gpus", "labels", "finished", "user", "no_new_privs", "network", "wall_s", "native"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.binary(max_size=64).map(lambda b: b.hex()))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)),
                      max_leaves=12)
documents = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str] | None]:
    """One request: its body and headers, in one of the encodings a client may send (or may not)."""
    form = draw(st.sampled_from(["json", "msgpack", "bytes", "frame", "empty", "bad-type"]))
    if form == "json":
        return json.dumps(draw(documents), default=str).encode(), None
    if form == "msgpack":
        doc = draw(documents)
        try:
            return msgspec.msgpack.encode(doc), {CONTENT_TYPE_HEADER: "application/msgpack"}
        except OverflowError:  # an integer beyond 64 bits has no MessagePack form: JSON carries it
            return json.dumps(doc, default=str).encode(), None
    if form == "frame":
        return MAGIC + draw(st.binary(max_size=200)), None
    if form == "bad-type":
        return draw(st.binary(max_size=64)), {CONTENT_TYPE_HEADER: draw(st.sampled_from(
            ["text/plain", "application/x-fabric-frame", "application/json; charset=utf-8", "*/*", ""]))}
    if form == "empty":
        return b"", None
    return draw(st.binary(max_size=300)), None


def concrete(subject: str, token: str) -> str:
    """An endpoint's subject with its wildcard tokens (a core id) filled in."""
    return ".".join(token if t == "*" else t for t in subject.split("."))


@pytest.fixture(scope="module")
async def fabric_endpoints(js_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
                           ) -> AsyncIterator[tuple[str, list[str]]]:
    from fabric.service import ServiceSettings
    from fabric.services.allocator import AllocatorService
    from fabric_ext.arena import Arena

    state = tmp_path_factory.mktemp("hostile")
    async with one_node_fabric(js_server.url, state, prefix="hostile") as node:
        alloc = AllocatorService(ServiceSettings(credentials=creds_for(AllocatorService), nats_url=js_server.url,
                                                 node=node, state_dir=state / "allocator"), capacity=32 << 20)
        await alloc.start()
        nc = await connect(js_server.url)
        try:
            subjects: set[str] = set()
            for name in ("allocator", "spawner", "gpu-monitor", "scheduler"):
                ping = json.loads((await nc.request(f"$SRV.PING.{name}", b"", timeout=5)).data)
                info = json.loads((await nc.request(f"$SRV.INFO.{name}.{ping['id']}", b"", timeout=5)).data)
                subjects |= {ep["subject"] for ep in info["endpoints"] if ".u." not in ep["subject"]}
        finally:
            await nc.close()
        try:
            assert len(subjects) >= 35, sorted(subjects)
            yield js_server.url, sorted(subjects)
        finally:
            await alloc.stop()
            Arena(alloc.prefix, alloc.capacity).destroy()


#: endpoints with no user form (trusted callers only: the nodes' pull, the gateways' webhook reports, the figures)
PLAIN_ONLY = frozenset({"fabric.task.pull", "fabric.task.callback", "fabric.task.stats"})


async def test_every_endpoint_answers_hostile_input_without_crashing(fabric_endpoints: tuple[str, list[str]]
                                                                     ) -> None:
    url, subjects = fabric_endpoints
    admin = await connect(url)
    from fabric.credentials import read_credentials

    user_opts = read_credentials(realm().client).connect_options()
    import nats

    user = await nats.connect(url, **user_opts)
    crashes: list[str] = []
    hangs: list[str] = []
    answered = 0

    async def send(nc: Any, subject: str, body: bytes, headers: dict[str, str] | None) -> None:
        nonlocal answered
        try:
            msg = await nc.request(subject, body, timeout=TIMEOUT_S, headers=headers)
        except nats.errors.TimeoutError:
            hangs.append(f"{subject} <- {body[:60]!r} {headers}")
            return
        answered += 1
        code = (msg.headers or {}).get("Nats-Service-Error-Code")
        if code is not None and not code.startswith("4") and code not in CAPACITY:
            why = (msg.headers or {}).get("Nats-Service-Error")
            crashes.append(f"{subject} <- {body[:80]!r} {headers}: {code} {why}")

    try:
        loop = asyncio.get_running_loop()

        def hostile(subject: str) -> Any:
            """The hypothesis test of one endpoint: run in a thread, sending through this loop."""

            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(req=bodies(), token=st.text(alphabet="abcxyz0123-_", min_size=1, max_size=12),
                   as_user=st.booleans())
            def run(req: tuple[bytes, dict[str, str] | None], token: str, as_user: bool) -> None:
                body, headers = req
                target = concrete(subject, token)
                as_user = as_user and subject not in PLAIN_ONLY  # no user form: a user may not send there
                if as_user:
                    target = user_subject("tester", target)
                nc = user if as_user else admin
                asyncio.run_coroutine_threadsafe(send(nc, target, body, headers), loop).result(TIMEOUT_S + 5)

            return run

        for subject in subjects:
            if subject == "fabric.task.pull":
                continue  # the nodes' side: a pull is a long poll held open for work (its input is checked below)
            await loop.run_in_executor(None, hostile(subject))
        # the pull: hostile bodies are refused before any holding (a malformed PullRequest is 400)
        for body in (b"", b"{", b"\x00" * 10, json.dumps({"node": 5}).encode(), json.dumps({"slots": -1}).encode()):
            await send(admin, "fabric.task.pull", body, None)
        assert not crashes, "5xx answers to hostile input:\n" + "\n".join(crashes[:20])
        assert not hangs, "no answer within the timeout:\n" + "\n".join(hangs[:20])
        assert answered >= len(subjects) * EXAMPLES // 2
        # and the fabric still works
        ok = await admin.request("fabric.nodes.list", b"{}", timeout=5)
        assert "Nats-Service-Error-Code" not in (ok.headers or {})
    finally:
        await admin.close()
        await user.close()
