"""Prometheus metrics, defined once here and handed to the parts that record them.

Counters and histograms are recorded on the request path; gauges of state (queue depth, warm
workers) are read from the runtime when Prometheus scrapes, so the hot path never updates them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serve import errors

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OUTCOMES: tuple[tuple[type[errors.ServeError], str], ...] = (
    (errors.InvalidInputError, "invalid_input"),
    (errors.ModelNotFoundError, "not_found"),
    (errors.ModelNotReadyError, "unavailable"),
    (errors.QueueFullError, "queue_full"),
    (errors.DeadlineExceededError, "deadline_exceeded"),
    (errors.ModelExecutionError, "model_error"),
)


def outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    for kind, name in OUTCOMES:
        if isinstance(exc, kind):
            return name
    return "error"


class ModelGauges(Collector):
    """Per-model state read at scrape time from ``source``: name → (queue depth, warm, passing)."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, int, int, int]]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "warmserve_queue_depth", "Requests waiting in the batcher", labels=["model"]
        )
        warm = GaugeMetricFamily(
            "warmserve_workers_warm", "Warm workers taking traffic", labels=["model"]
        )
        passing = GaugeMetricFamily(
            "warmserve_workers_passing_probes",
            "Warm workers whose last probe passed",
            labels=["model"],
        )
        for name, queue_depth, warm_count, passing_count in self._source():
            depth.add_metric([name], queue_depth)
            warm.add_metric([name], warm_count)
            passing.add_metric([name], passing_count)
        return [depth, warm, passing]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "warmserve_requests",
            "Inference requests by outcome",
            ["model", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "warmserve_request_duration_seconds",
            "End-to-end time of successful requests inside the server",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "warmserve_batch_rows",
            "Rows per batch sent to a worker",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    def watch(self, source: Callable[[], Iterable[tuple[str, int, int, int]]]) -> None:
        self.registry.register(ModelGauges(source))
