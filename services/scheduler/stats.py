"""The scheduler's figures for dashboards and Prometheus (``fabric.task.stats``): what it holds, what ended.

Unfinished tasks are counted from memory at each request (exact: the scheduler holds every
one); ended tasks are counted as they end, since this scheduler became active -- counters,
so Prometheus' ``rate()`` works and a failover is an ordinary counter reset -- with the
submit-to-end latency in cumulative histogram buckets.  The HTTP gateway's ``/metrics``
reads it (services/gateway/metrics.py) instead of listing records, so its cost does not
grow with the number of tasks on record.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable
from typing import Any, Final

from fabric.schema.tasks import STATES, TERMINAL, TaskRecord, TaskStatsReply

__all__ = ["TaskStats", "LATENCY_BUCKETS_S"]

#: the latency histogram's upper bounds (s), submit to end
LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_WAITING: Final = ("submitted", "queued", "waiting")


class TaskStats:
    def __init__(self) -> None:
        self.since_ms = int(time.time() * 1000)
        self.ended = dict.fromkeys(sorted(TERMINAL), 0)
        self.buckets = [0] * len(LATENCY_BUCKETS_S)  # per bucket (made cumulative in the reply)
        self.count = 0
        self.sum_s = 0.0

    def record(self, rec: TaskRecord) -> None:
        """One task ended (durably)."""
        self.ended[rec.state] = self.ended.get(rec.state, 0) + 1
        if rec.finished_ms and rec.created_ms:
            seconds = max(0.0, (rec.finished_ms - rec.created_ms) / 1000.0)
            i = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
            if i < len(self.buckets):
                self.buckets[i] += 1
            self.count += 1
            self.sum_s += seconds

    def reply(self, live: Iterable[Any], instance: str) -> TaskStatsReply:
        states = {s: 0 for s in STATES if s not in TERMINAL}
        by_priority: dict[str, int] = {}
        for task in live:
            rec = task.rec
            if rec.state in TERMINAL:
                continue
            states[rec.state] = states.get(rec.state, 0) + 1
            if rec.state in _WAITING:
                by_priority[str(rec.priority)] = by_priority.get(str(rec.priority), 0) + 1
        cumulative, total = [], 0
        for n in self.buckets:
            total += n
            cumulative.append(total)
        return TaskStatsReply(live=states, waiting_by_priority=by_priority, ended=dict(self.ended),
                              latency_bounds_s=list(LATENCY_BUCKETS_S), latency_counts=cumulative,
                              latency_count=self.count, latency_sum_s=round(self.sum_s, 6), since_ms=self.since_ms,
                              instance=instance)
