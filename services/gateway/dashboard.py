"""The dashboard: one page and its assets, all served by the gateway (it works offline).

``GET /`` is the page (``static/index.html``); ``GET /?token=fbt_…`` (the link ``fabric up``
prints) checks the token, keeps it in an HttpOnly ``SameSite=Strict`` cookie -- which the
page's ``fetch`` calls and its ``EventSource`` send without script access to the token --
and redirects to ``/`` so the token leaves the address bar and the history.
``POST /api/logout`` forgets it.  The page itself holds no secret and reads everything
through the API, with the caller's own scopes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final

from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.params import QueryParameter
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from .access import COOKIE
from .context import gateway_of
from .problems import problems

__all__ = ["ROUTES", "STATIC_DIR"]

STATIC_DIR: Final = Path(__file__).with_name("static")
#: what the page may load and talk to: only the gateway itself
CSP: Final = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
              "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_HEADERS: Final = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


@get("/", include_in_schema=False, responses=problems(401))
async def index(request: Request[Any, Any, Any],
                token: Annotated[str | None, QueryParameter(max_length=128)] = None) -> Response[Any]:
    gw = gateway_of(request)
    if token is not None:
        gw.access.identify(token)  # 401 problem for a bad one: never keep a token that does not work
        secure = request.url.scheme == "https"
        return Redirect("/", status_code=303, headers=_HEADERS, cookies=[Cookie(
            key=COOKIE, value=token, httponly=True, samesite="strict", secure=secure, path="/")])
    return Response(content=(STATIC_DIR / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                    headers=_HEADERS)


@post("/api/logout", tags=["access"], status_code=204, summary="Forget the dashboard's token cookie",
      security=[{}], response_cookies=[Cookie(key=COOKIE, value="", max_age=0, path="/", httponly=True,
                                              samesite="strict")])
async def logout() -> None:
    return None


ROUTES: list[Any] = [index, logout, create_static_files_router(path="/static/ui", directories=[STATIC_DIR],
                                                               include_in_schema=False)]
