"""What a submit request asks for, read once: its kind, its resources, its process (docs/protocol.md "submit").

A request may come in fabric's own shape (``kind``, ``resources``, ``exec``) or in UDCS's
``POST /api/submit`` body (``type``, ``requirements``, ``binary``/``args``/``environment``,
``architecture``/``os``), unchanged; these functions fold both into one meaning, and refuse
what cannot mean anything with a 400 that says why.  Part of the scheduler (:mod:`.service`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from fabric.errors import BadRequest
from fabric.schema.processes import NativeExec
from fabric.schema.tasks import KINDS, UDCS_TYPES, ExecSpec, Resources, SubmitRequest

__all__ = ["kind_of", "resources_of", "exec_spec_of", "payload_of"]


def resources_of(msg: SubmitRequest) -> Resources:
    """The task's Resources, with UDCS's ``requirements`` and ``architecture``/``os`` folded in."""
    res = msg.resources or Resources()
    req = msg.requirements
    changes: dict[str, Any] = {}
    if req is not None:
        if req.min_memory_gb:
            changes["mem"] = max(res.mem, int(req.min_memory_gb * (1 << 30)))
        if req.gpu_required and res.gpus == 0:
            changes["gpus"] = 1.0
        if req.architecture:
            changes["arch"] = req.architecture
    if msg.architecture and not res.arch and "arch" not in changes:
        changes["arch"] = msg.architecture
    if msg.os and not res.os:
        changes["os"] = msg.os
    return msgspec.structs.replace(res, **changes) if changes else res


def kind_of(msg: SubmitRequest) -> str:
    """The task's kind, from ``kind`` or UDCS's ``type`` (BadRequest when neither names one, or they disagree)."""
    kind = msg.kind.lower()
    if msg.type:
        udcs = UDCS_TYPES.get(msg.type.upper())
        if udcs is None:
            raise BadRequest(f"unknown task type {msg.type!r}: fabric runs {', '.join(sorted(UDCS_TYPES))} "
                             f"(or name a kind: {', '.join(KINDS)})")
        if kind and kind != udcs:
            raise BadRequest(f"kind {msg.kind!r} contradicts type {msg.type!r} (which is kind {udcs!r})")
        kind = udcs
    if not kind:
        raise BadRequest(f"a task needs a kind ({', '.join(KINDS)}) or a UDCS type "
                         f"({', '.join(sorted(UDCS_TYPES))})")
    if kind not in KINDS:
        raise BadRequest(f"unknown task kind {msg.kind!r}: one of {', '.join(KINDS)}")
    return kind


def payload_of(msg: SubmitRequest, kind: str) -> bytes:
    """The payload bytes of a task that is not ``exec`` (a process object as payload is for exec only)."""
    if isinstance(msg.payload, ExecSpec):
        raise BadRequest(f"a {kind} task's payload is bytes (base64 in JSON): an object payload ({{\"argv\": ...}}) "
                         "is an exec (NATIVE_EXEC) task's process")
    return msg.payload


def exec_spec_of(msg: SubmitRequest) -> ExecSpec:
    """An exec task's process: ``exec``, UDCS's ``binary`` (stored on the node) / ``args``, or an object payload."""
    spec = msg.exec
    if isinstance(msg.payload, ExecSpec):
        if spec is not None:
            raise BadRequest("an exec task names its process once: in exec or in payload, not both")
        spec = msg.payload
    if msg.binary is not None:
        # a UDCS body signs its binary in the request's own signature field (the file's, as fabric sign prints)
        native = NativeExec(sha256=hashlib.sha256(msg.binary).hexdigest(), data=msg.binary,
                            architecture=msg.architecture, os=msg.os or "linux", signature=msg.signature)
        spec = ExecSpec(argv=["program", *(msg.args or [])], env=msg.environment, native=native)
    elif spec is None and msg.args:
        spec = ExecSpec(argv=list(msg.args), env=msg.environment)
    if spec is None or not spec.argv:
        raise BadRequest("an exec task needs exec.argv (or UDCS binary/args, or payload {\"argv\": [...]})")
    return spec
