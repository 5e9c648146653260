"""Who an HTTP request is, what it may do, and how fast: bearer tokens, scopes, rate limits.

A request names its token in ``Authorization: Bearer fbt_…``, or in the ``fabric_token``
cookie the dashboard sets when opened with ``/?token=…`` (an ``EventSource`` cannot send
headers).  The token's record (:mod:`fabric.gateway_tokens`) gives its scopes and the
fabric user it acts for.  Without a token, a request is anonymous: when the gateway
listens on loopback only, it gets ``gateway.loopback_scopes`` (default ``read``: the
nodes, devices, services, metrics and events; no tasks, no memory, no submit); when it
listens beyond loopback, nothing -- 401.  A token that is not known is 401 even on
loopback (a typo must not quietly fall back to anonymous).

Rate limits: a token bucket per token (per client address for anonymous requests),
``gateway.rate_per_s`` with bursts of ``gateway.burst``; past it, 429 ``rate_limited``
with ``Retry-After``.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from litestar import Request

from fabric.config.model import GatewayConfig
from fabric.errors import PermissionDenied, RateLimited, Unauthenticated
from fabric.gateway_tokens import TOKEN_PREFIX, TokenTable

__all__ = ["Caller", "Access", "RateLimiter", "COOKIE", "is_loopback_host"]

#: the cookie the dashboard's token lives in (HttpOnly, SameSite=Strict)
COOKIE: Final = "fabric_token"
#: rate-limit buckets kept (the least recently used go first)
MAX_BUCKETS: Final = 10_000


@dataclass(frozen=True)
class Caller:
    """An HTTP request's identity: a token's, or anonymous."""

    #: the token's name, or "anonymous"
    name: str
    #: the fabric user its NATS requests act for; None: the plain form (an admin token)
    user: str | None
    scopes: frozenset[str]
    anonymous: bool = False

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or self.admin

    @property
    def sees_tasks(self) -> bool:
        """Whether it may read tasks: an admin sees all, a token's user its own, anonymous none."""
        return self.admin or (self.user is not None and not self.anonymous)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RateLimiter:
    """Token buckets by key: *rate* per second, at most *burst* at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Take one; 0.0 when allowed, else the seconds until one is free."""
        now = time.monotonic()
        level, at = self._buckets.pop(key, (self.burst, now))
        level = min(self.burst, level + (now - at) * self.rate)
        if level >= 1.0:
            self._buckets[key] = (level - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (level, now)
            wait = (1.0 - level) / self.rate
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return wait


class Access:
    """The gateway's door: :meth:`caller` identifies a request and charges its rate; :meth:`require` its scope."""

    def __init__(self, tokens: TokenTable, config: GatewayConfig) -> None:
        self.tokens = tokens
        self.loopback_only = is_loopback_host(config.http_host)
        self.anonymous = Caller("anonymous", None, frozenset(config.loopback_scopes if self.loopback_only else ()),
                                anonymous=True)
        self.limiter = RateLimiter(config.rate_per_s, config.burst)

    @staticmethod
    def token_of(request: Request[Any, Any, Any]) -> str | None:
        auth = request.headers.get("authorization")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthenticated("the Authorization header takes a bearer token: 'Authorization: Bearer fbt_…'")
            return value.strip()
        cookie = request.cookies.get(COOKIE)
        return cookie or None

    def identify(self, token: str | None) -> Caller:
        if token is None:
            return self.anonymous
        if not token.startswith(TOKEN_PREFIX):
            raise Unauthenticated("not a fabric token: tokens start with 'fbt_' (`fabric token create` makes one)")
        record = self.tokens.lookup(token)
        if record is None:
            why = "" if self.tokens.loaded else " (the gateway has not read the token table yet: try again)"
            raise Unauthenticated(f"unknown or removed token{why}")
        return Caller(record.name, record.user or None, frozenset(record.scopes))

    def caller(self, request: Request[Any, Any, Any]) -> Caller:
        """Who *request* is; 401 for a bad token, 429 past its rate."""
        caller = self.identify(self.token_of(request))
        address = request.client.host if request.client else ""
        key = f"addr:{address}" if caller.anonymous else f"token:{caller.name}"
        wait = self.limiter.take(key)
        if wait > 0:
            exc = RateLimited(f"too many requests from {caller.name}: at most {self.limiter.rate:g} a second "
                              f"(bursts of {self.limiter.burst:g}); retry in {wait:.2f} s")
            exc.http_headers = {"Retry-After": str(max(1, math.ceil(wait)))}  # type: ignore[attr-defined]
            raise exc
        return caller

    def require(self, request: Request[Any, Any, Any], scope: str) -> Caller:
        """The request's caller, if it has *scope*: 401 when anonymous without it, 403 for a token without it."""
        caller = self.caller(request)
        if not caller.allows(scope):
            if caller.anonymous:
                where = ("on loopback" if self.loopback_only
                         else "beyond loopback (the gateway listens on a public address)")
                raise Unauthenticated(f"this needs a token with the {scope!r} scope {where}: send "
                                      "'Authorization: Bearer fbt_…' (`fabric token create --scope ...`)")
            raise PermissionDenied(f"token {caller.name!r} lacks the {scope!r} scope (it has "
                                   f"{', '.join(sorted(caller.scopes))})")
        return caller
