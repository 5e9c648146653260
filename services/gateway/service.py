"""The gateway service: an ADR-32 service on NATS, and an HTTP server on one port.

It answers no NATS subject of its own (``$SRV`` finds it, its ``url`` in the metadata);
its work is HTTP.  At start it binds its listening socket itself (``gateway.http_host``,
``gateway.http_port``; 0 picks a free port) so the real address is known before it
serves and is put in its ``$SRV.INFO`` metadata; then uvicorn serves the Litestar
application (:mod:`.app`) on that socket in the service's own event loop, beside the
NATS connection the routes send on.  ``TCP_NODELAY`` is set on the listening socket (the
accepted ones inherit it): without it a keep-alive client waits out the peer's delayed
ACK -- measured 44 ms per request, 0.5 ms with it.

State: none of its own.  The token table is read from the ``fabric_gateway`` bucket and
followed with a watch (:class:`fabric.gateway_tokens.TokenTable`), so any number of
gateways may run, on any nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from typing import Any

from nats.js import JetStreamContext

from fabric import __version__
from fabric.gateway_tokens import WEBHOOK_SECRET_KEY, TokenTable, bucket_config
from fabric.jetstream import JetStreamResource, KeyValueBucket, webhook_stream
from fabric.protocol import subjects
from fabric.protocol.streams import GATEWAY_BUCKET
from fabric.schema.gateway import GatewayInfo
from fabric.service import Endpoint, FabricService, Request, ServiceSettings

from . import webhooks
from .access import Access
from .context import Gateway
from .events import EventHub
from .nats_monitor import NatsMonitor
from .upstream import Upstream

__all__ = ["GatewayService", "listen"]

#: how long open connections (event streams) get to finish when the gateway stops (s)
SHUTDOWN_GRACE_S = 2


def listen(host: str, port: int) -> socket.socket:
    """The listening socket: IPv6 when *host* is one, reuse of a port in TIME_WAIT, no Nagle delay."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class GatewayService(FabricService):
    name = "gateway"
    description = "fabric HTTP gateway: REST API, live dashboard, Prometheus metrics, webhooks"

    def __init__(self, settings: ServiceSettings) -> None:
        super().__init__(settings)
        self.config = settings.config.gateway
        self.tokens = TokenTable()
        self.sock: socket.socket | None = None
        self.url = ""
        self._server: Any = None
        self._http: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._deliver: asyncio.Task[None] | None = None
        self.webhooks: webhooks.WebhookDeliverer | None = None
        self.gateway: Gateway | None = None

    def endpoints(self) -> Sequence[Endpoint]:
        return [self.cluster_endpoint(subjects.GATEWAY, subjects.Gateway.INFO, self.info),
                self.node_endpoint(subjects.GATEWAY, subjects.Gateway.INFO, self.info)]

    async def info(self, req: Request) -> GatewayInfo:
        assert self.gateway is not None
        access = self.gateway.access
        varz, routez = await asyncio.gather(self.gateway.monitor.get("varz"), self.gateway.monitor.get("routez"))
        routes = sorted({str(r.get("remote_name") or r.get("remote_id") or "")
                         for r in (routez or {}).get("routes") or [] if isinstance(r, dict)} - {""})
        return GatewayInfo(node=self.node, url=self.url, version=__version__, loopback_only=access.loopback_only,
                           anonymous_scopes=sorted(access.anonymous.scopes), event_streams=self.gateway.events.clients,
                           tokens=len(self.tokens), tokens_loaded=self.tokens.loaded,
                           nats_server=str((varz or {}).get("server_name") or ""),
                           cluster=str(((varz or {}).get("cluster") or {}).get("name") or ""), routes=routes,
                           nats_figures=_figures(varz))

    def metadata(self) -> dict[str, str]:
        return {"url": self.url}

    def jetstream_resources(self) -> Sequence[JetStreamResource]:
        # the webhook stream is the scheduler's too: whichever starts first makes it, then the shared consumer
        return [KeyValueBucket(bucket_config()), webhook_stream(), webhooks.consumer(self.config)]

    async def on_jetstream(self, js: JetStreamContext | None) -> None:
        # (re)made at start and after every reconnect: follow the token bucket and the webhooks afresh
        for task in (self._watch, self._deliver):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._watch = self._deliver = None
        if js is not None:
            self._watch = asyncio.ensure_future(self._follow_tokens(js))
            self._deliver = asyncio.ensure_future(self._deliver_webhooks(js))

    async def _deliver_webhooks(self, js: JetStreamContext) -> None:
        while True:
            try:
                self.webhooks = webhooks.WebhookDeliverer(js, Upstream(self.connection), self.config,
                                                          lambda: self.url, __version__, self.log)
                await self.webhooks.ensure_secret()
                await self.webhooks.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # JetStream away, the consumer gone: again shortly
                self.log.warning("webhook delivery stopped; again in 1 s", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(1.0)

    async def _follow_tokens(self, js: JetStreamContext) -> None:
        while True:
            try:
                kv = await js.key_value(GATEWAY_BUCKET)
                watcher = await kv.watchall()
                async for entry in watcher:
                    if entry is None:  # the watch has read what the bucket held: tokens work from now on
                        self.tokens.loaded = True
                        continue
                    if entry.key == WEBHOOK_SECRET_KEY and entry.value and self.webhooks is not None:
                        self.webhooks.secret = bytes(entry.value)  # `fabric webhook-secret --rotate`
                        continue
                    self.tokens.apply(entry.key, entry.value if entry.operation is None else None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the bucket or the server went away: read it all again shortly
                self.log.warning("token watch ended; again in 1 s", error=str(exc) or type(exc).__name__, exc_info=True)
                await asyncio.sleep(1.0)

    async def on_start(self) -> None:
        self.sock = listen(self.config.http_host, self.config.http_port)
        host, port = self.sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if self.config.tls_cert else "http"
        self.url = f"{scheme}://{shown}:{port}"
        upstream = Upstream(self.connection)
        self.gateway = Gateway(node=self.node, version=__version__, config=self.config,
                               access=Access(self.tokens, self.config), upstream=upstream,
                               events=EventHub(self.connection, upstream, self.config.sse_queue),
                               monitor=NatsMonitor(self.config.nats_monitor_url))

    async def on_serving(self) -> None:
        import uvicorn

        from .app import build_app

        assert self.gateway is not None and self.sock is not None
        app = build_app(self.gateway)
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S), server_header=False,
                                proxy_headers=False, ws="none", ssl_certfile=self.config.tls_cert or None,
                                ssl_keyfile=self.config.tls_key or None)
        self._server = uvicorn.Server(config)
        # uvicorn installs signal handlers in serve(): the kit's own handle SIGTERM, so keep them
        self._server.install_signal_handlers = lambda: None
        sock = self.sock
        self._http = self.background(lambda: self._server.serve(sockets=[sock]), name="http")
        self.background(self.gateway.events.watch_services, name="services-watch")
        self.log.info("gateway listening", url=self.url, loopback_only=self.gateway.access.loopback_only,
                      anonymous_scopes=sorted(self.gateway.access.anonymous.scopes))

    async def on_stopping(self) -> None:
        # uvicorn stops taking connections, lets requests in flight finish (event streams: SHUTDOWN_GRACE_S),
        # then closes the rest; the background task ends with it
        if self._server is not None and self._http is not None:
            self._server.should_exit = True
            await asyncio.wait({self._http}, timeout=SHUTDOWN_GRACE_S + 1.0)

    async def on_stop(self) -> None:
        for task in (self._watch, self._deliver):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.sock is not None:
            self.sock.close()
        if self.gateway is not None:
            await self.gateway.monitor.close()


#: the /varz figures a gateway hands on (fabric_nats_* in /metrics)
VARZ_FIGURES = ("connections", "total_connections", "subscriptions", "slow_consumers", "in_msgs", "out_msgs",
                "in_bytes", "out_bytes", "mem", "cpu", "routes")


def _figures(varz: dict[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in VARZ_FIGURES:
        value = (varz or {}).get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out
