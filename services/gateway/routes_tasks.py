"""Tasks over HTTP: UDCS's ``POST /api/submit``, and listing, reading, cancelling tasks and reading results.

The body of ``POST /api/submit`` is the scheduler's :class:`SubmitRequest` -- which takes
UDCS's body as it is (``type``, ``priority``, ``requirements``, ``payload``,
``callback_url``, ``binary``/``args``...) besides fabric's own fields -- and goes to
``fabric.task.submit`` as the caller: the task is the token user's (an admin token's: the
fabric admin's), and only its owner or an admin reads or cancels it, as over NATS.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, delete, get, post
from litestar.params import JSONBody, PathParameter, QueryParameter

from fabric.errors import BadRequest, Conflict, PermissionDenied
from fabric.protocol import subjects
from fabric.protocol.headers import EXIT_CODE_HEADER, TASK_STATE_HEADER
from fabric.protocol.subjects import Task
from fabric.schema.tasks import (
    TERMINAL,
    ListRequest,
    ResultChunk,
    ResultRequest,
    SubmitReply,
    SubmitRequest,
    TaskListReply,
    TaskRecord,
    TaskRequest,
    WaitRequest,
)

from .access import Caller
from .context import Gateway, gateway_of
from .problems import problems
from .webhooks import refused

__all__ = ["ROUTES"]

#: task ids as the contract allows them (fabric.schema.tasks.TaskIdStr)
TaskId = Annotated[str, PathParameter(pattern=r"^[A-Za-z0-9_-]{1,80}$", max_length=80)]


def _subject(verb: str) -> str:
    return subjects.cluster(subjects.TASK, verb)


def _reader(gw: Gateway, request: Request[Any, Any, Any]) -> Caller:
    caller = gw.access.require(request, "read")
    if not caller.sees_tasks:
        raise PermissionDenied("tasks belong to users: send a token (`fabric token create`) to see its user's tasks")
    return caller


@post("/api/submit", tags=["tasks"], status_code=201,
      summary="Submit a task (UDCS's body as it is, or fabric's own fields); 201 with its id",
      responses=problems(400, 401, 403, 404, 409, 413, 422, 429, 503))
async def submit(request: Request[Any, Any, Any], data: JSONBody[SubmitRequest]) -> SubmitReply:
    gw = gateway_of(request)
    caller = gw.access.require(request, "submit")
    if data.notify:
        raise PermissionDenied("notify is for NATS clients; over HTTP name a callback_url, or follow /api/events")
    if data.callback_url and (why := refused(data.callback_url)):
        raise BadRequest(f"callback_url {data.callback_url!r} cannot be called: {why}")
    return await gw.upstream.call(caller, _subject(Task.SUBMIT), data, SubmitReply)


@get("/api/tasks", tags=["tasks"], summary="The caller's tasks (an admin token's: everyone's), newest first",
     responses=problems(400, 401, 403, 429, 503))
async def list_tasks(request: Request[Any, Any, Any],
                     task_state: Annotated[str, QueryParameter(name="state", max_length=32, pattern=r"^[a-z]*$")] = "",
                     limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 100) -> TaskListReply:
    gw = gateway_of(request)
    caller = _reader(gw, request)
    return await gw.upstream.call(caller, _subject(Task.LIST), ListRequest(state=task_state, limit=limit),
                                  TaskListReply)


@get("/api/tasks/{task_id:str}", tags=["tasks"], summary="One task's record: state, attempts, result or error",
     responses=problems(400, 401, 403, 404, 429, 503))
async def get_task(request: Request[Any, Any, Any], task_id: TaskId) -> TaskRecord:
    gw = gateway_of(request)
    caller = _reader(gw, request)
    return await gw.upstream.call(caller, _subject(Task.GET), TaskRequest(id=task_id), TaskRecord)


@delete("/api/tasks/{task_id:str}", tags=["tasks"], status_code=200,
        summary="Cancel a task that has not ended; its record, now cancelled",
        responses=problems(400, 401, 403, 404, 409, 429, 503))
async def cancel_task(request: Request[Any, Any, Any], task_id: TaskId) -> TaskRecord:
    gw = gateway_of(request)
    caller = gw.access.require(request, "submit")
    return await gw.upstream.call(caller, _subject(Task.CANCEL), TaskRequest(id=task_id), TaskRecord)


@get("/api/tasks/{task_id:str}/result", tags=["tasks"], media_type="application/octet-stream",
     summary="A succeeded task's result bytes (an exec task's output; a python task's pickle); ?wait=S waits "
             "up to S seconds for it to end",
     responses=problems(400, 401, 403, 404, 409, 429, 500, 503))
async def task_result(request: Request[Any, Any, Any], task_id: TaskId,
                      wait: Annotated[float, QueryParameter(ge=0, le=300)] = 0.0) -> Response[bytes]:
    gw = gateway_of(request)
    caller = _reader(gw, request)
    if wait > 0:
        rec = await gw.upstream.call(caller, _subject(Task.WAIT), WaitRequest(id=task_id, timeout_s=wait),
                                     TaskRecord, timeout=wait + 5.0)
    else:
        rec = await gw.upstream.call(caller, _subject(Task.GET), TaskRequest(id=task_id), TaskRecord)
    headers = {TASK_STATE_HEADER: rec.state}
    if rec.exit_code is not None:
        headers[EXIT_CODE_HEADER] = str(rec.exit_code)
    if rec.state not in TERMINAL:
        raise Conflict(f"task {task_id} has not ended ({rec.state}): ask again, or pass ?wait=SECONDS")
    if rec.state != "succeeded":
        why = f": {rec.error.kind}: {rec.error.message}" if rec.error is not None else ""
        raise Conflict(f"task {task_id} ended {rec.state}{why} (GET /api/tasks/{task_id} has its record)")
    data = rec.result
    if rec.result_ref:
        parts: list[bytes] = []
        offset, size = 0, None
        while size is None or offset < size:
            chunk = await gw.upstream.call(caller, _subject(Task.RESULT), ResultRequest(id=task_id, offset=offset),
                                           ResultChunk)
            size = chunk.size
            if not chunk.data:
                break
            parts.append(chunk.data)
            offset += len(chunk.data)
        data = b"".join(parts)
    return Response(content=data, media_type="application/octet-stream", headers=headers)


ROUTES = [submit, list_tasks, get_task, cancel_task, task_result]
