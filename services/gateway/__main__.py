"""``python -m fabric.services.gateway --nats-url URL --node NODE --state-dir DIR``.

``gateway.http_host`` / ``gateway.http_port`` (``$FABRIC_GATEWAY_HTTP_HOST``, ``$FABRIC_GATEWAY_HTTP_PORT``;
``fabric up --http-host/--http-port``) say where it listens (docs/config.md, docs/gateway.md).
"""

from fabric.service import main

from .service import GatewayService

if __name__ == "__main__":
    main(GatewayService)
