"""The operator's own Prometheus metrics, served on /metrics.

Jobs by phase are counted when scraped, from the phases the watch last saw, so
a deleted job or a restarted operator never leaves a stale count behind.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from finetune.api.status import Phase

from . import failures

RECONCILE_SECONDS = Histogram(
    "finetune_operator_reconcile_duration_seconds",
    "Time to reconcile one FineTuneJob.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
RESTARTS = Counter("finetune_operator_restarts_total", "Gang restarts, by reason.", ["reason"])
FAILURES = Counter(
    "finetune_operator_failures_total", "Failed FineTuneJobs, by reason.", ["reason"]
)
QUEUE_SECONDS = Histogram(
    "finetune_operator_queue_duration_seconds",
    "Time from a FineTuneJob's creation until all its pods run.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)
RESTART_REASONS = (
    *failures.DISRUPTION_REASONS,
    "HeartbeatTimeout",
    "TrainerError",
    "PodFailed",
    "JobFailed",
)
FAILURE_REASONS = (
    *failures.PERMANENT_REASONS,
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "SchedulingTimeout",
    "InvalidSpec",
    "Rejected",
    "JobFileMissing",
)
# Every reason's series exists from the start, at zero: rate() and the dashboard see
# a count go from 0 to 1 rather than a series appear.
for _reason in RESTART_REASONS:
    RESTARTS.labels(_reason)
for _reason in FAILURE_REASONS:
    FAILURES.labels(_reason)


class JobPhases(Collector):
    """finetune_operator_jobs{phase=...}: how many FineTuneJobs are in each phase."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str], str] = {}

    def seen(self, namespace: str, name: str, phase: str | None) -> None:
        self.phases[(namespace, name)] = phase or Phase.PENDING.value

    def gone(self, namespace: str, name: str) -> None:
        self.phases.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "finetune_operator_jobs", "FineTuneJobs by phase.", labels=["phase"]
        )
        counts = dict.fromkeys((p.value for p in Phase), 0)
        for phase in self.phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family


PHASES = JobPhases()
REGISTRY.register(PHASES)
