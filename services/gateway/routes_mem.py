"""Remote memory over HTTP, raw bytes in and out, so ``curl`` is a client too.

``POST /api/mem`` allocates (JSON ``{"size": N}``; a handle back), ``PUT /api/mem/{handle}``
writes the request body at ``?offset=``, ``GET /api/mem/{handle}`` reads ``?length=`` bytes
at ``?offset=`` (default: to the end of the block), ``DELETE`` frees it.  The handle is the
capability, as everywhere in fabric: the gateway checks the token's scope, the allocator
checks the handle.  Values larger than one NATS message are split by the client's own
memory area (:mod:`.upstream`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Request, Response, delete, get, post, put
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import JSONBody, PathParameter, QueryParameter

from fabric.errors import BadRequest, FabricError, NoResponders, Unauthenticated, UnknownHandle, UnknownNode
from fabric.handles import MAX_HANDLE_LEN, parse
from fabric.protocol import subjects
from fabric.protocol.subjects import Mem
from fabric.schema.memory import AllocReply, AllocRequest, StatReply

from .access import Caller
from .context import Gateway, gateway_of
from .problems import problems
from .views import AllocBody, Freed, Written

__all__ = ["ROUTES"]

Handle = Annotated[str, PathParameter(min_length=1, max_length=MAX_HANDLE_LEN)]
Offset = Annotated[int, QueryParameter(ge=0, le=(1 << 63) - 1)]


def _caller(request: Request[Any, Any, Any], scope: str) -> Caller:
    caller = gateway_of(request).access.require(request, scope)
    if caller.anonymous:  # remote memory belongs to users: anonymous requests read fabric-wide state only
        raise Unauthenticated("remote memory needs a token: send 'Authorization: Bearer fbt_…' "
                              "(`fabric token create --scope submit`)")
    return caller


@contextlib.asynccontextmanager
async def _reaching(gw: Gateway, node: str, unknown: FabricError) -> AsyncIterator[None]:
    """A request to *node*'s allocator: no responders there and no such live node is *unknown* (404), not 503."""
    try:
        yield
    except NoResponders:
        if node and not await gw.upstream.node_known(node):
            raise unknown from None
        raise


def _handle(gw: Gateway, handle: str) -> contextlib.AbstractAsyncContextManager[None]:
    try:
        node = parse(handle).node
    except FabricError:
        node = ""  # the client's own parse refuses it with its error in a moment
    return _reaching(gw, node, UnknownHandle(f"unknown handle {handle!r}: no live node {node!r} issued it"))


@post("/api/mem", tags=["memory"], status_code=201, summary="Allocate a block (zeroed); its handle",
      responses=problems(400, 401, 403, 404, 413, 429, 503, 507))
async def alloc(request: Request[Any, Any, Any], data: JSONBody[AllocBody]) -> AllocReply:
    gw = gateway_of(request)
    caller = _caller(request, "submit")
    if data.node and not subjects.valid_node_name(data.node):
        raise BadRequest(f"invalid node name {data.node!r}: 1 to 64 letters, digits, '_' and '-'")
    subject = (subjects.node_scoped(subjects.MEM, data.node, Mem.ALLOC) if data.node
               else subjects.cluster(subjects.MEM, Mem.ALLOC))
    async with _reaching(gw, data.node, UnknownNode(f"no live node {data.node!r} (GET /api/nodes lists them)")):
        return await gw.upstream.call(caller, subject, AllocRequest(size=data.size, owner=caller.user or "",
                                                                    ttl_s=data.ttl_s), AllocReply)


@dataclass
class _RawBodyOperation(Operation):
    """The OpenAPI operation of a route whose body is raw bytes (Litestar would describe a JSON one)."""

    def __post_init__(self) -> None:
        binary = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
        self.request_body = RequestBody(required=True, description="the bytes to write",
                                        content={"application/octet-stream": OpenAPIMediaType(schema=binary)})


@put("/api/mem/{handle:str}", tags=["memory"], summary="Write the request body (raw bytes) into the block at ?offset=",
     responses=problems(400, 401, 403, 404, 413, 429, 503), operation_class=_RawBodyOperation)
async def write(request: Request[Any, Any, Any], handle: Handle, offset: Offset = 0) -> Written:
    gw = gateway_of(request)
    caller = _caller(request, "submit")
    data = await request.body()  # any Content-Type: the body is the bytes (413 past gateway.max_body)
    mem = gw.upstream.memory(caller)
    async with _handle(gw, handle):
        return Written(written=await mem.rwrite(handle, data, offset) if data else 0)


@get("/api/mem/{handle:str}", tags=["memory"], media_type="application/octet-stream",
     summary="Read ?length= bytes at ?offset= (default: to the end of the block)",
     responses=problems(400, 401, 403, 404, 413, 429, 503))
async def read(request: Request[Any, Any, Any], handle: Handle, offset: Offset = 0,
               length: Annotated[int | None, QueryParameter(ge=0, le=1 << 30)] = None) -> Response[bytes]:
    gw = gateway_of(request)
    caller = _caller(request, "read")
    mem = gw.upstream.memory(caller)
    async with _handle(gw, handle):
        return Response(content=await mem.rread(handle, length, offset), media_type="application/octet-stream")


@get("/api/mem/{handle:str}/stat", tags=["memory"], summary="The block's size, node, permission and lease",
     responses=problems(400, 401, 403, 404, 429, 503))
async def stat(request: Request[Any, Any, Any], handle: Handle) -> StatReply:
    gw = gateway_of(request)
    caller = _caller(request, "read")
    async with _handle(gw, handle):
        return await gw.upstream.memory(caller).rstat(handle)


@delete("/api/mem/{handle:str}", tags=["memory"], status_code=200, summary="Free the block; its size",
        responses=problems(400, 401, 403, 404, 409, 429, 503))
async def free(request: Request[Any, Any, Any], handle: Handle) -> Freed:
    gw = gateway_of(request)
    caller = _caller(request, "submit")
    async with _handle(gw, handle):
        return Freed(freed=await gw.upstream.memory(caller).rfree(handle))


ROUTES = [alloc, write, read, stat, free]
