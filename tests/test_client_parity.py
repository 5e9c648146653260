"""The sync client and its async twin stay in step: same methods, same signatures.

For each sync/async pair (FabricClient/AsyncFabricClient, RemoteBuffer/AsyncRemoteBuffer,
RemoteProcess/AsyncRemoteProcess, Core/AsyncCore) every public method and property of one
must exist on the other with the same ``inspect.signature``.  The only differences allowed
are the documented ones: where the async signature names an async type (``AsyncRemoteBuffer``,
``AsyncIterator``...), the sync one names its twin (``RemoteBuffer``, ``Iterator``...), as
:data:`fabric.client.twin.TWINS` lists them; ``async with`` pairs with ``with``; and the few
members named in ``ONLY_ASYNC`` / ``ONLY_SYNC`` below, each with its reason.  The sync
methods hand-written for the caller's-thread fast path (rread, rwrite, ...) are held to
the same rule as the generated ones.  Also: ``fabric.__all__`` is exactly what it was.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest

import fabric
from fabric.client import (
    AsyncCore,
    AsyncFabricClient,
    AsyncRemoteBuffer,
    AsyncRemoteProcess,
    Core,
    FabricClient,
    RemoteBuffer,
    RemoteProcess,
)

pytestmark = pytest.mark.unit

#: the documented renames, written out here rather than imported: the test must not trust the code it checks
TWINS = {"AsyncFabricClient": "FabricClient", "AsyncRemoteBuffer": "RemoteBuffer",
         "AsyncRemoteProcess": "RemoteProcess", "AsyncCore": "Core", "AsyncIterator": "Iterator",
         "AsyncIterable": "Iterable", "AsyncTaskFuture": "TaskFuture"}
#: dunders with a sync counterpart of another name
DUNDER_TWINS = {"__aenter__": "__enter__", "__aexit__": "__exit__"}
PAIRS = [(FabricClient, AsyncFabricClient), (RemoteBuffer, AsyncRemoteBuffer), (RemoteProcess, AsyncRemoteProcess),
         (Core, AsyncCore)]
ONLY_ASYNC: dict[type, set[str]] = {
    # the transport's chunk sizes: the sync client reads them through .aio
    AsyncFabricClient: {"max_payload", "write_chunk", "read_chunk"},
}
ONLY_SYNC: dict[type, set[str]] = {
    # the async client's url is an instance attribute; .aio is the async client itself
    FabricClient: {"url", "aio"},
    # instance attributes on AsyncCore (set from the load's reply), read-only properties here
    Core: {"id", "node", "name", "info"},
}

#: plain methods in both clients, by design: a context manager that never waits on the loop
NOT_COROUTINES: dict[type, set[str]] = {AsyncFabricClient: {"progress"}}

ALL = [
    "__version__", "FabricClient", "AsyncFabricClient", "RemoteBuffer", "AsyncRemoteBuffer", "RemoteProcess",
    "AsyncRemoteProcess", "Core", "AsyncCore", "Out", "TaskFuture", "Resources", "as_completed", "wait", "schema",
    "Limits", "Sandbox", "ExitInfo", "FabricError",
    "BadRequest", "InvalidFrame", "OutOfRange", "PermissionDenied", "Unauthenticated", "NotFound", "UnknownHandle",
    "StaleHandle",
    "UnknownProcess", "ExecutableNotFound", "Conflict", "DoubleFree", "TooLarge", "Infeasible", "NotEnforceable",
    "WrongArchitecture", "CoreLoadFailed", "QuotaExceeded", "InternalError", "CorruptionDetected", "JobError",
    "JobFailed", "WorkerCrashed", "JobTimeout", "Unavailable", "OutOfMemory", "UnknownNode", "UnknownDevice",
    "KernelBuildFailed", "DeviceUnavailable", "TaskFailed", "TaskDead", "TaskCancelled",
]


def _sync_text(text: str) -> str:
    return re.sub(r"\b(" + "|".join(TWINS) + r")\b", lambda m: TWINS[m.group(1)], text)


def _members(cls: type) -> dict[str, Any]:
    """Public methods and properties (and the context-manager dunders), by name, as the class defines them."""
    out: dict[str, Any] = {}
    for name in dir(cls):
        if name.startswith("_") and name not in (*DUNDER_TWINS, *DUNDER_TWINS.values()):
            continue
        value = inspect.getattr_static(cls, name)
        if isinstance(value, property) or inspect.isfunction(value):
            out[name] = value
    return out


def _signature(member: Any) -> str:
    fn = member.fget if isinstance(member, property) else member
    return str(inspect.signature(fn))


@pytest.mark.parametrize(("sync_cls", "async_cls"), PAIRS, ids=[s.__name__ for s, _ in PAIRS])
def test_every_public_method_has_its_twin_with_the_same_signature(sync_cls: type, async_cls: type) -> None:
    sync, aio = _members(sync_cls), _members(async_cls)
    expected = {DUNDER_TWINS.get(name, name) for name in aio} - ONLY_ASYNC.get(async_cls, set())
    got = set(sync) - ONLY_SYNC.get(sync_cls, set())
    assert got == expected, f"missing in {sync_cls.__name__}: {sorted(expected - got)}; " \
                            f"missing in {async_cls.__name__}: {sorted(got - expected)}"
    for name, member in aio.items():
        twin = DUNDER_TWINS.get(name, name)
        if twin not in sync:
            continue
        assert isinstance(member, property) == isinstance(sync[twin], property), (sync_cls.__name__, name)
        want = _sync_text(_signature(member))
        assert _signature(sync[twin]) == want, f"{sync_cls.__name__}.{twin} drifted from {async_cls.__name__}.{name}"


def test_the_once_lost_signatures_are_whole() -> None:
    """rspawn and opencl took ``**options`` in the sync client: now every keyword is there, by name."""
    spawn = inspect.signature(FabricClient.rspawn).parameters
    assert {"env", "cwd", "limits", "sandbox", "node", "stream", "executable"} <= set(spawn)
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in spawn.values())
    ocl = inspect.signature(FabricClient.opencl).parameters
    assert {"local_size", "device", "check_sizes", "timeout"} <= set(ocl)
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in ocl.values())
    assert FabricClient.rspawn.__doc__ == AsyncFabricClient.rspawn.__doc__


def test_the_async_methods_are_coroutines_and_the_sync_ones_are_not() -> None:
    for sync_cls, async_cls in PAIRS:
        for name, member in _members(async_cls).items():
            if isinstance(member, property) or name in DUNDER_TWINS or name not in _members(sync_cls):
                continue
            if name in NOT_COROUTINES.get(async_cls, set()):
                assert not inspect.iscoroutinefunction(member), f"{async_cls.__name__}.{name} is a coroutine now"
                continue
            assert inspect.iscoroutinefunction(member), f"{async_cls.__name__}.{name}"
            assert not inspect.iscoroutinefunction(_members(sync_cls)[name]), f"{sync_cls.__name__}.{name}"


def test_fabric_all_is_pinned() -> None:
    assert fabric.__all__ == ALL
    for name in ALL:
        assert hasattr(fabric, name), name


def test_the_constructors_take_the_same_arguments() -> None:
    # what a FabricClient is made with reaches its AsyncFabricClient unchanged (local, data_plane, credentials...)
    from fabric import AsyncFabricClient, FabricClient

    assert str(inspect.signature(FabricClient.__init__)) == str(inspect.signature(AsyncFabricClient.__init__))
