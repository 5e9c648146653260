"""The scheduler: durable tasks on JetStream, placed by requirements, pulled by free nodes.

See docs/protocol.md "Tasks" for the contract and :mod:`.service` for how the parts fit.
"""

from .service import SchedulerService

__all__ = ["SchedulerService"]
