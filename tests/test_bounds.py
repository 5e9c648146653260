"""Every integer a request carries is bounded, and an oversized one is 400 ``bad_request`` from the real service.

msgspec decodes integers of any size, so a field without explicit bounds would let
2**64, 2**70 or 10**30 through to a handler, where it was clamped by a C ``int64``,
passed the arena as a 413 or sat in a limit.  Two checks keep that from coming back:

* every int field of every request struct in :mod:`fabric.schema` (found by walking
  the structs with ``msgspec.inspect``, nested ones and list items included) has a
  lower and an upper bound that fits an int64;
* for every such field, each oversized value (and -1 where negatives are invalid),
  sent as JSON over a real nats-server to every endpoint that decodes that struct,
  is answered 400 ``bad_request`` with a message naming the field and the value as
  sent.  The cases are generated from the structs, so a new field is covered by
  itself; a new request struct with int fields fails until its endpoints are listed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import msgspec.inspect as mi
import nats
import pytest

from fabric import schema
from fabric.schema import INT_MAX
from fabric_ext import wire
from tests._nats import connect

#: request struct -> (the endpoints that decode it, a minimal body the oversized value goes into).
#: ``{mem}`` is the allocator's node, ``{proc}`` the spawner's.  The bodies are valid apart from the
#: value under test (the handles are unknown, the core is not loadable): nothing is created when
#: the bound holds.
ENDPOINTS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "AllocRequest": (["fabric.mem.alloc", "fabric.mem.{mem}.alloc"], {"size": 1}),
    "ReallocRequest": (["fabric.mem.{mem}.realloc"], {"handle": "v1:x", "size": 1}),
    "WriteRequest": (["fabric.mem.{mem}.write"], {"handle": "v1:x", "data": ""}),
    "ReadRequest": (["fabric.mem.{mem}.read"], {"handle": "v1:x"}),
    "ReadvRequest": (["fabric.mem.{mem}.readv"], {"items": [{"handle": "v1:x"}]}),
    "WritevRequest": (["fabric.mem.{mem}.writev"], {"items": [{"handle": "v1:x", "data": ""}]}),
    "SpawnRequest": (["fabric.proc.spawn", "fabric.proc.{proc}.spawn"], {"argv": ["true"]}),
    "KillRequest": (["fabric.proc.{proc}.kill"], {"id": "x:y"}),
    "LoadCoreRequest": (["fabric.core.load", "fabric.core.{proc}.load"], {"name": "no-such-core"}),
}

OVERSIZED = [2**63, 2**64, 2**70, 10**30]

Path = tuple[str | int, ...]


def request_structs() -> list[type[msgspec.Struct]]:
    """Every request of the public contract: the Structs of fabric.schema named ``*Request``."""
    found = [obj for name, obj in vars(schema).items()
             if name.endswith("Request") and isinstance(obj, type) and issubclass(obj, msgspec.Struct)]
    assert len(found) >= 15, f"schema has fewer request structs than expected: {[s.__name__ for s in found]}"
    return found


def int_fields(t: mi.Type, path: Path = ()) -> Iterator[tuple[Path, mi.IntType]]:
    """(path, IntType) of every int a message of type *t* can carry; a list's items are at index 0."""
    if isinstance(t, mi.IntType):
        yield path, t
    elif isinstance(t, mi.StructType):
        for f in t.fields:
            yield from int_fields(f.type, (*path, f.encode_name))
    elif isinstance(t, mi.UnionType):
        for member in t.types:
            yield from int_fields(member, path)
    elif isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        yield from int_fields(t.item_type, (*path, 0))
    elif isinstance(t, mi.DictType):
        assert not list(int_fields(t.key_type)), f"{path}: an int dict key cannot be bounded here"
        yield from int_fields(t.value_type, (*path, "key"))
    elif isinstance(t, mi.TupleType):
        for i, item in enumerate(t.item_types):
            yield from int_fields(item, (*path, i))


def dotted(path: Path) -> str:
    """A path as the service's error message spells it: ``items[0].offset``."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


def with_value(base: dict[str, Any], path: Path, value: int) -> dict[str, Any]:
    body = copy.deepcopy(base)
    node: Any = body
    for step, nxt in zip(path, path[1:], strict=False):
        if isinstance(step, int):
            node = node[step]  # the base holds one item in each list on the way
        else:
            node = node.setdefault(step, [{}] if isinstance(nxt, int) else {})
    node[path[-1]] = value
    return body


def cases() -> list[Any]:
    out = []
    for struct in request_structs():
        if struct.__name__ not in ENDPOINTS:
            continue  # test_every_request_with_ints_has_endpoints says whether that is right
        for path, t in int_fields(mi.type_info(struct)):
            values = list(OVERSIZED)
            if (t.ge is not None and t.ge >= 0) or (t.gt is not None and t.gt >= -1):
                values.append(-1)
            for value in values:
                out.append(pytest.param(struct.__name__, path, value, id=f"{struct.__name__}.{dotted(path)}={value}"))
    return out


@pytest.mark.unit
def test_every_request_int_field_has_bounds_that_fit_int64():
    unbounded = []
    for struct in request_structs():
        for path, t in int_fields(mi.type_info(struct)):
            low = t.ge if t.ge is not None else t.gt
            high = t.le if t.le is not None else t.lt
            if low is None or high is None or not (-(2**63) <= low and high <= INT_MAX):
                unbounded.append(f"{struct.__name__}.{dotted(path)}: ge={low} le={high}")
    assert not unbounded, "int fields need Annotated[int, Meta(ge=..., le=...)] (see fabric.schema.UInt): " + \
        "; ".join(unbounded)


@pytest.mark.unit
def test_every_request_with_ints_has_endpoints():
    with_ints = {s.__name__ for s in request_structs() if list(int_fields(mi.type_info(s)))}
    assert with_ints == set(ENDPOINTS), "list the endpoints of each request struct with int fields in ENDPOINTS"


@pytest.mark.unit
def test_the_walk_finds_nested_and_listed_fields():
    """The generator reaches into optional structs and list items (else the table would be thin)."""
    found = {(s.__name__, dotted(p)) for s in request_structs() for p, _ in int_fields(mi.type_info(s))}
    assert {("SpawnRequest", "limits.cpu_s"), ("ReadvRequest", "items[0].length"),
            ("KillRequest", "signal"), ("LoadCoreRequest", "max_workers")} <= found


# module-scoped, unlike conftest's nc: one connection serves the hundreds of parametrized cases
@pytest.fixture(scope="module")
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    conn = await connect(nats_url)
    yield conn
    await conn.close()


@pytest.mark.parametrize("struct,path,value", cases())
async def test_oversized_integer_is_bad_request(nc, allocator, spawner, struct, path, value):
    subjects, base = ENDPOINTS[struct]
    body = json.dumps(with_value(base, path, value)).encode()
    for template in subjects:
        subject = template.format(mem=allocator.node, proc=spawner.node)
        msg = await nc.request(subject, body, timeout=10)
        headers = msg.headers or {}
        assert headers.get("Nats-Service-Error-Code") == "400", (subject, body, headers)
        assert headers["Fabric-Error"] == "bad_request", (subject, headers)
        text = headers["Nats-Service-Error"]
        assert f"{dotted(path)} = {value}" in text, f"{subject}: the message must name the field and the value " \
            f"as sent: {text!r}"
        assert json.loads(msg.data)["error"]["message"] == text
    assert not spawner.table.live, "a request with an out-of-range field started a process"


async def test_oversized_integer_in_msgpack(nc, allocator):
    """MessagePack carries up to 2**64-1: past int64 it is refused the same way, with the value as sent."""
    hdr = {"Content-Type": "application/msgpack"}
    msg = await nc.request(f"fabric.mem.{allocator.node}.read",
                           msgspec.msgpack.encode({"handle": "v1:x", "offset": 2**64 - 1}), headers=hdr, timeout=5)
    assert msg.headers["Nats-Service-Error-Code"] == "400" and msg.headers["Fabric-Error"] == "bad_request"
    assert "offset = 18446744073709551615" in msg.headers["Nats-Service-Error"]
    assert msgspec.msgpack.decode(msg.data)["error"]["kind"] == "bad_request"


async def test_frame_positions_past_int64_are_bad_request_with_the_value_as_sent(nc, allocator, aclient):
    """A frame's u64 positions reach the arena's int64 ones: past 2**63-1 they are refused, never clamped."""
    buf = await aclient.rmalloc(8)
    hdr = {"Content-Type": wire.CONTENT_TYPE}
    try:
        for verb, frame, sent in (
            ("write", wire.encode(wire.KIND_WRITE, [(buf.handle, 2**63, 1, 0)], [b"x"]), 2**63),
            ("write", wire.encode(wire.KIND_WRITE, [(buf.handle, 2**64 - 2, 1, 0)], [b"x"]), 2**64 - 2),
            ("read", wire.encode(wire.KIND_READ, [(buf.handle, 2**63, 1, 0)]), 2**63),
            ("read", wire.encode(wire.KIND_READ, [(buf.handle, 0, 2**63, 0)]), 2**63),
        ):
            msg = await nc.request(f"fabric.mem.{allocator.node}.{verb}", frame, headers=hdr, timeout=5)
            assert msg.headers["Nats-Service-Error-Code"] == "400", (verb, msg.headers)
            assert msg.headers["Fabric-Error"] == "bad_request", (verb, msg.headers)
            assert str(sent) in msg.headers["Nats-Service-Error"], (verb, msg.headers)
        assert await aclient.rread(buf) == bytes(8)
    finally:
        await aclient.rfree(buf)


async def test_an_offset_within_int64_is_out_of_range_with_the_value_as_sent(nc, allocator, aclient):
    buf = await aclient.rmalloc(8)
    try:
        for field in ("offset", "length"):
            msg = await nc.request(f"fabric.mem.{allocator.node}.read",
                                   json.dumps({"handle": buf.handle, field: INT_MAX}).encode(), timeout=5)
            assert msg.headers["Fabric-Error"] == "out_of_range" and str(INT_MAX) in msg.headers["Nats-Service-Error"]
    finally:
        await aclient.rfree(buf)
