"""The error tree: one registry, codes and kinds round-trip through the wire headers."""

from __future__ import annotations

import pickle

import pytest

import fabric
from fabric import errors
from fabric.errors import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    ERROR_KIND_HEADER,
    DoubleFree,
    FabricError,
    NotFound,
    QuotaExceeded,
    StaleHandle,
    error_from_wire,
    error_headers,
    registered_kinds,
)

pytestmark = pytest.mark.unit  # no server, no service process: `pytest -m unit`

# 401 is the client's own (NATS refused its credentials): no service sends it
CODES = {400, 401, 403, 404, 409, 413, 422, 429, 500, 503, 507}


def test_every_design_code_has_a_class():
    assert {cls.code for cls in registered_kinds().values()} == CODES


@pytest.mark.parametrize("kind,cls", sorted(registered_kinds().items()))
def test_headers_round_trip_to_the_exact_class(kind, cls):
    exc = cls("some text")
    hdrs = error_headers(exc)
    assert hdrs[ERROR_CODE_HEADER] == str(cls.code)
    back = error_from_wire(hdrs[ERROR_CODE_HEADER], hdrs[ERROR_HEADER], hdrs[ERROR_KIND_HEADER])
    assert type(back) is cls and back.message == "some text"


def test_code_without_kind_maps_to_the_code_family():
    assert type(error_from_wire("404", "x")) is NotFound
    assert type(error_from_wire("409", "x")) is errors.Conflict
    assert type(error_from_wire("500", "x")) is errors.InternalError
    assert type(error_from_wire("599", "x")) is FabricError
    assert type(error_from_wire("junk", "x")) is errors.InternalError


def test_duplicate_kind_is_rejected():
    with pytest.raises(TypeError, match="registered twice"):
        class Again(FabricError):  # defining it is the test: the registry refuses it
            code = 409
            kind = "double_free"


def test_subclass_without_own_kind_is_rejected():
    with pytest.raises(TypeError, match="must define its own kind"):
        class NoKind(NotFound):  # defining it is the test
            pass


def test_fields_are_attributes_and_survive_pickle():
    exc = QuotaExceeded("over quota", owner="alice", limit=100, requested=200)
    assert (exc.owner, exc.limit, exc.requested) == ("alice", 100, 200)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is QuotaExceeded and back.limit == 100 and back.message == "over quota"


def test_families():
    assert issubclass(StaleHandle, NotFound) and issubclass(DoubleFree, errors.Conflict)
    assert DoubleFree.code == 409 and StaleHandle.code == 404


def test_public_surface():
    """The package's public face (httpx habit: a test guards __all__)."""
    expected = {
        "__version__", "FabricClient", "AsyncFabricClient", "RemoteBuffer", "AsyncRemoteBuffer", "schema",
        "FabricError", "BadRequest", "InvalidFrame", "OutOfRange", "PermissionDenied", "Unauthenticated",
        "NotFound",
        "UnknownHandle", "StaleHandle", "Conflict", "DoubleFree", "TooLarge", "Infeasible", "QuotaExceeded",
        "InternalError", "CorruptionDetected", "Unavailable", "OutOfMemory",
        "Core", "AsyncCore", "CoreLoadFailed", "JobError", "JobFailed", "WorkerCrashed", "JobTimeout",
        "RemoteProcess", "AsyncRemoteProcess", "Limits", "Sandbox", "ExitInfo", "UnknownProcess",
        "ExecutableNotFound", "NotEnforceable", "WrongArchitecture",
        "UnknownNode", "UnknownDevice", "KernelBuildFailed", "DeviceUnavailable", "Out",
        "TaskFuture", "Resources", "as_completed", "wait", "TaskFailed", "TaskDead", "TaskCancelled",
    }
    assert set(fabric.__all__) == expected
    for name in expected:
        assert hasattr(fabric, name)
