"""Logging setup shared by the services and the supervisor.

structlog, rendered as JSON lines when stderr is not a terminal (the supervisor
sends each service's output to its log file) and as readable text when it is.
Every service binds ``service`` and ``node``; request handlers add ``subject``
and ``request_id``.  The level comes from the configuration (``log_level``,
``FABRIC_LOG_LEVEL``: :mod:`fabric.config`), which the caller read.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info") -> None:
    """Configure structlog once for this process at *level* (the configuration's ``log_level``)."""
    name = level.upper()
    numeric = getattr(logging, name, logging.INFO)
    renderer: structlog.types.Processor
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
