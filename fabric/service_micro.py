"""The kit's adapter to ``nats.micro`` (ADR-32 services: ``$SRV.PING|INFO|STATS``).

nats.micro registers the service and its endpoints and answers the ``$SRV`` verbs;
the kit keeps its own per-endpoint statistics (the real work of each request, not
just nats.micro's dispatch, see :class:`~fabric.service.Endpoint`) and serves some
endpoints on its own subscriptions (``side_endpoints``: a hot path that must not go
through nats.micro's dispatch).  :class:`MicroService` puts both into INFO and STATS.

What it relies on: the public ``Service.info()``, ``Service.stats()``, ``add_endpoint``,
``start``, ``stop``, ``id`` and ``Request.subject/headers/data/respond``, plus one
behaviour nats-py does not document -- its ``$SRV.INFO``/``$SRV.STATS`` handlers build
their reply by calling ``self.info()`` / ``self.stats()``, so overriding them here
changes what the service reports.  That is why pyproject.toml pins nats-py to the
minor version this was tested with (``tests/test_service_kit.py``,
``test_stats_count_real_work``, fails if it changes).
"""

from __future__ import annotations

from collections.abc import Sequence

from nats.micro.service import EndpointInfo, Service, ServiceInfo, ServiceStats

from .service_endpoint import Endpoint

__all__ = ["MicroService"]


class MicroService(Service):
    """nats.micro's Service, with STATS taken from the kit's own per-endpoint timings.

    *side_endpoints* are served on the service's own subscriptions; they are listed in
    INFO and STATS like the others, so ``$SRV`` shows every subject the service answers.
    """

    kit_endpoints: Sequence[Endpoint] = ()
    side_endpoints: Sequence[Endpoint] = ()

    def info(self) -> ServiceInfo:
        info = super().info()
        info.endpoints.extend(
            EndpointInfo(name=ep.name, subject=ep.subject, queue_group=ep.queue_group)
            for ep in self.side_endpoints)
        return info

    def stats(self) -> ServiceStats:
        # id, name, version, metadata and start time as nats.micro keeps them; the endpoints are the kit's
        stats = super().stats()
        stats.endpoints = [ep.stats() for ep in (*self.kit_endpoints, *self.side_endpoints)]
        return stats
