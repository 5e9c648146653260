"""Every failure as RFC 9457 ``application/problem+json``, with the fabric error code and kind.

The HTTP status is the fabric code (docs/protocol.md "Errors"): a 404 ``unknown_handle``
from the allocator is an HTTP 404 whose body says ``"kind": "unknown_handle"``.  What
Litestar itself refuses -- a body that does not decode or validate (400), one over the
size limit (413), a path no route has (404), a method a route lacks (405) -- gets the same
shape, so a client reads one error format whatever failed.  Anything unexpected is logged
with its traceback and answered 500 ``internal`` without the details.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

from fabric.errors import BadRequest, FabricError, InternalError, NotFound, TooLarge

__all__ = ["PROBLEM_JSON", "Problem", "problem_response", "exception_handlers", "problems", "TOKEN_OR_LOOPBACK"]

PROBLEM_JSON: Final = "application/problem+json"
#: the problem type URIs: one per fabric error kind (docs/gateway.md lists them with docs/protocol.md's table)
TYPE_PREFIX: Final = "urn:fabric:error:"

log = structlog.get_logger(service="gateway")


class Problem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem details, with fabric's ``code`` and ``kind`` (the ``Fabric-Error`` of the NATS reply)."""

    type: str
    title: str
    status: int
    detail: str
    code: int
    kind: str
    instance: str = ""


_TITLES: Final = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                  405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large", 415: "Unsupported Media Type",
                  422: "Unprocessable Content", 429: "Too Many Requests", 500: "Internal Server Error",
                  503: "Service Unavailable", 507: "Insufficient Storage"}
_KINDS: Final = {405: "method_not_allowed", 415: "unsupported_media_type"}


def _problem(status: int, kind: str, detail: str, instance: str,
             headers: dict[str, str] | None = None) -> Response[Problem]:
    body = Problem(type=TYPE_PREFIX + kind, title=_TITLES.get(status, "Error"), status=status, detail=detail,
                   code=status, kind=kind, instance=instance)
    return Response(content=body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def problem_response(exc: FabricError, instance: str = "", headers: dict[str, str] | None = None) -> Response[Problem]:
    return _problem(exc.code, exc.kind, exc.message, instance, headers)


def _on_fabric(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    assert isinstance(exc, FabricError)
    headers = getattr(exc, "http_headers", None)
    if exc.code >= 500 and not exc.kind.startswith(("unavailable", "no_responders", "request_timed_out")):
        log.warning("request failed", path=request.url.path, code=exc.code, kind=exc.kind, error=exc.message)
    return problem_response(exc, request.url.path, headers)


def _on_validation(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    assert isinstance(exc, ValidationException)
    detail = str(exc.detail or "invalid request")
    extra = exc.extra if isinstance(exc.extra, list) else []
    reasons = [f"{e.get('key') or e.get('source') or 'body'}: {e.get('message')}" for e in extra
               if isinstance(e, dict)]
    if reasons:
        detail = "; ".join(reasons)
    return problem_response(BadRequest(detail), request.url.path)


def _on_http(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        return problem_response(NotFound(f"no route {request.method} {request.url.path}"), request.url.path)
    if status == 413:
        return problem_response(TooLarge(str(exc.detail) or "request body too large"), request.url.path)
    if status == 400:
        return problem_response(BadRequest(str(exc.detail) or "bad request"), request.url.path)
    kind = _KINDS.get(status) or FabricError.kind
    return _problem(status, kind, str(exc.detail) or _TITLES.get(status, "error"), request.url.path,
                    dict(exc.headers or {}))


def _on_other(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    log.exception("unexpected error", path=request.url.path, error=str(exc) or type(exc).__name__)
    return problem_response(InternalError("internal error: the gateway's log has the details"), request.url.path)


def exception_handlers() -> dict[type[Exception] | int, Any]:
    return {FabricError: _on_fabric, ValidationException: _on_validation, HTTPException: _on_http,
            Exception: _on_other}


#: the OpenAPI security of routes an anonymous caller on loopback may use (``gateway.loopback_scopes``): a token,
#: or none
TOKEN_OR_LOOPBACK: Final[list[dict[str, list[str]]]] = [{"bearer": []}, {}]


def problems(*codes: int) -> dict[int, ResponseSpec]:
    """The OpenAPI responses of a route's failures: each a :class:`Problem` in ``application/problem+json``."""
    return {c: ResponseSpec(data_container=Problem, description=_TITLES.get(c, "error"), media_type=PROBLEM_JSON)
            for c in codes}

