"""The gateway's Litestar application: every route, problem+json errors, the OpenAPI document, offline docs.

The OpenAPI 3.1 document (``/schema/openapi.json``) is generated from the same msgspec
Structs the NATS services decode (fabric.schema), so HTTP and NATS cannot drift apart;
its interactive page (``/schema/swagger``) loads Swagger UI from the gateway itself
(the ``swagger-ui-bundle`` wheel's files), never from a CDN.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router

from . import dashboard, events, metrics, routes_fabric, routes_mem, routes_tasks
from .context import Gateway
from .problems import exception_handlers

__all__ = ["build_app", "SWAGGER_PREFIX"]

SWAGGER_PREFIX = "/static/swagger"


def _swagger_dir() -> str:
    import swagger_ui_bundle  # type: ignore[import-untyped]

    return str(swagger_ui_bundle.swagger_ui_path)


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
        openapi_config=openapi,
        cors_config=CORSConfig(allow_origins=list(cfg.cors_origins), allow_credentials=False)
        if cfg.cors_origins else None,
        request_max_body_size=cfg.max_body,
        state=State({"gateway": gateway}),
        debug=False,
        logging_config=None,
    )
