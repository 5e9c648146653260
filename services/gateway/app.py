"""The gateway's Litestar application: every route, problem+json errors, the OpenAPI document, offline docs.

The OpenAPI 3.1 document (``/schema/openapi.json``) is generated from the same msgspec
Structs the NATS services decode (fabric.schema), so HTTP and NATS cannot drift apart;
its interactive page (``/schema/swagger``) loads Swagger UI 5 from the gateway itself
(the ``swagger-ui-py`` wheel's files, Apache-2.0), never from a CDN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Litestar, Request
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.enums import ParamType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import BodyKwarg
from litestar.static_files import create_static_files_router

from fabric.errors import BadRequest

from . import dashboard, events, metrics, routes_fabric, routes_mem, routes_tasks
from .context import Gateway
from .problems import exception_handlers

__all__ = ["build_app", "SWAGGER_PREFIX"]

SWAGGER_PREFIX = "/static/swagger"


def _swagger_dir() -> str:
    # Swagger UI 5 (OpenAPI 3.1; swagger-ui-bundle's 4.x cannot read 3.1), as the swagger-ui-py wheel ships it
    import swagger_ui  # type: ignore[import-untyped]

    return str(Path(swagger_ui.__file__).parent / "static")


#: handler arguments that are never query parameters (Litestar's reserved names)
_RESERVED = frozenset({"request", "data", "state", "scope", "headers", "cookies", "query", "socket", "body"})
_QUERY_NAMES: dict[int, frozenset[str]] = {}


def _query_names(handler: Any) -> frozenset[str]:
    """The query parameters a route takes, from its signature (aliases included), computed once per route."""
    known = _QUERY_NAMES.get(id(handler))
    if known is None:
        names: set[str] = set()
        for name, field in handler.parsed_fn_signature.parameters.items():
            kwarg = field.kwarg_definition
            kind = getattr(kwarg, "param_type", None)
            if name not in _RESERVED and kind in (None, ParamType.QUERY) and not isinstance(kwarg, BodyKwarg):
                names.add(getattr(kwarg, "name", None) or name)
        known = _QUERY_NAMES[id(handler)] = frozenset(names)
    return known


async def _unknown_query(request: Request[Any, Any, Any]) -> None:
    """A query parameter the route does not take is 400: ``?lenght=5`` must not be silently ignored."""
    if not request.query_params:
        return
    allowed = _query_names(request.route_handler)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        takes = f"it takes {', '.join(sorted(allowed))}" if allowed else "it takes none"
        raise BadRequest(f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(u[:64]) for u in unknown[:5])} for {request.url.path}: {takes}")


def build_app(gateway: Gateway) -> Litestar:
    cfg = gateway.config
    openapi = OpenAPIConfig(
        title="fabric gateway", version=gateway.version,
        description="fabric over HTTP: tasks (UDCS's POST /api/submit), remote memory, nodes, devices, services, "
                    "live events and metrics. Errors are RFC 9457 problem+json whose status is the fabric error "
                    "code (docs/protocol.md). Send 'Authorization: Bearer fbt_…' (`fabric token create`).",
        path="/schema",
        components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}),
        security=[{"bearer": []}],
        render_plugins=[SwaggerRenderPlugin(
            js_url=f"{SWAGGER_PREFIX}/swagger-ui-bundle.js", css_url=f"{SWAGGER_PREFIX}/swagger-ui.css",
            standalone_preset_js_url=f"{SWAGGER_PREFIX}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{SWAGGER_PREFIX}/favicon-32x32.png'>")],
    )
    route_handlers: list[Any] = [*routes_tasks.ROUTES, *routes_mem.ROUTES, *routes_fabric.ROUTES,
                                 *events.ROUTES, *metrics.ROUTES, *dashboard.ROUTES,
                                 create_static_files_router(path=SWAGGER_PREFIX, directories=[_swagger_dir()],
                                                            include_in_schema=False)]
    return Litestar(
        route_handlers=route_handlers,
        exception_handlers=exception_handlers(),
        before_request=_unknown_query,
        openapi_config=openapi,
        cors_config=CORSConfig(allow_origins=list(cfg.cors_origins), allow_credentials=False)
        if cfg.cors_origins else None,
        request_max_body_size=cfg.max_body,
        state=State({"gateway": gateway}),
        debug=False,
        logging_config=None,
    )
