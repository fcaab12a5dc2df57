"""Prometheus metrics, defined once here and handed to the parts that record them.

The request path records into plain per-model counters (ModelCounters: integer adds and one
bisect, no locks, no label look-ups); they and the gauges of state (queue depth, warm workers) are
turned into Prometheus families only when Prometheus scrapes. Everything runs on the event-loop
thread, so the counters need no lock.

Counters only ever grow while the process lives (Prometheus' rate() reads a drop as a restart).
What the server does before it turns ready (the front end's own loopback warm-up calls, calls
that come before readiness) is not user traffic: it is counted under the ``warmserve_warm_up_*``
series, which stop growing once the warm-up is over, and the user series start from zero then.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from serve import errors
from serve.cpus import LimitStat

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OUTCOMES: tuple[tuple[type[errors.ServeError], str], ...] = (
    (errors.InvalidInputError, "invalid_input"),
    (errors.ModelNotFoundError, "not_found"),
    (errors.ModelNotReadyError, "unavailable"),
    (errors.InflightLimitError, "inflight_bytes_full"),  # (a QueueFullError: first)
    (errors.QueueFullError, "queue_full"),
    (errors.AnswerTooLargeError, "answer_too_large"),
    (errors.DeadlineExceededError, "deadline_exceeded"),
    (errors.ModelOutOfMemoryError, "out_of_memory"),  # (a ModelExecutionError: first)
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


class InflightGauges(Collector):
    """The server-wide request bytes held in flight and their limit, read at scrape time from
    ``source``: () → (held, limit) (serve/frontend/admission.py)."""

    def __init__(self, source: Callable[[], tuple[int, int]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        held, limit = self._source()
        inflight = GaugeMetricFamily(
            "warmserve_inflight_request_bytes",
            "Bytes of inference requests held in flight (decoded, not yet answered) and of "
            "answers not yet sent",
            value=held,
        )
        budget = GaugeMetricFamily(
            "warmserve_inflight_request_bytes_limit",
            "Budget of request bytes in flight; beyond it requests get RESOURCE_EXHAUSTED",
            value=limit,
        )
        return [inflight, budget]


class CpuLimitGauges(Collector):
    """The process's CPU limit (the tightest CFS quota on its cgroup path) and how often it
    stopped the process, read at scrape time from ``source`` (serve/cpus.py: read_limit; None
    when the count cannot be read: no series then). A throttled server's own latency windows
    miss most of those pauses, which fall before a call reaches the handler."""

    def __init__(self, source: Callable[[], LimitStat | None]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        stat = self._source()
        if stat is None:
            return []
        return [
            GaugeMetricFamily(
                "warmserve_cpu_limit_cpus",
                "CPU limit of the server's cgroup (CFS quota / period, the tightest on its path)",
                value=stat.cpus,
            ),
            CounterMetricFamily(
                "warmserve_cpu_limit_periods",
                "CFS enforcement periods elapsed while the server's cgroup ran",
                value=stat.periods,
            ),
            CounterMetricFamily(
                "warmserve_cpu_limit_throttled_periods",
                "CFS periods in which the CPU limit stopped the server's processes until the "
                "next period",
                value=stat.throttled,
            ),
            CounterMetricFamily(
                "warmserve_cpu_limit_throttled_seconds",
                "Time the CPU limit held the server's processes stopped (summed over CPUs)",
                value=stat.throttled_s,
            ),
        ]


class ModelCounters:
    """One model's request outcomes, request durations and batch sizes since start. While
    ``warming`` (before the server turned ready), what is counted is warm-up traffic; once the
    warm-up ends it stays, frozen, in ``warm_up``."""

    __slots__ = (
        "duration_buckets",
        "duration_sum",
        "outcomes",
        "rows_buckets",
        "rows_sum",
        "warm_up",
        "warming",
    )

    def __init__(self, warming: bool = False) -> None:
        self.outcomes: dict[str, int] = {}
        self.duration_buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last is +Inf
        self.duration_sum = 0.0
        self.rows_buckets = [0] * (len(BATCH_BUCKETS) + 1)
        self.rows_sum = 0
        self.warming = warming
        self.warm_up: ModelCounters | None = None  # what the warm-up counted, once it is over

    def reset(self) -> None:
        """The warm-up is over (the server takes traffic now): what was counted so far moves to
        the warm-up series and the user series start from zero. Nothing is dropped: after the
        warm-up, or for counters that never had one, this changes nothing (counters never go
        down while the process lives)."""
        if not self.warming:
            return
        warm_up = ModelCounters()
        warm_up.outcomes = self.outcomes
        warm_up.duration_buckets, warm_up.duration_sum = self.duration_buckets, self.duration_sum
        warm_up.rows_buckets, warm_up.rows_sum = self.rows_buckets, self.rows_sum
        self.warm_up = warm_up
        self.outcomes = {}
        self.duration_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.rows_buckets = [0] * (len(BATCH_BUCKETS) + 1)
        self.rows_sum = 0
        self.warming = False

    def request_ok(self, seconds: float) -> None:
        outcomes = self.outcomes
        outcomes["ok"] = outcomes.get("ok", 0) + 1
        self.duration_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def request_failed(self, code: str) -> None:
        self.outcomes[code] = self.outcomes.get(code, 0) + 1

    def batch(self, rows: int) -> None:
        self.rows_buckets[bisect_left(BATCH_BUCKETS, rows)] += 1
        self.rows_sum += rows


def _histogram_buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    buckets, total = [], 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(total)))
    return buckets


_NOTHING_YET = ModelCounters()  # the user series of a model still warming up: all zero


class CountersCollector(Collector):
    def __init__(self, counters: dict[str, ModelCounters]) -> None:
        self._counters = counters

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "warmserve_requests", "Inference requests by outcome", labels=["model", "code"]
        )
        duration = HistogramMetricFamily(
            "warmserve_request_duration_seconds",
            "End-to-end time of successful requests inside the server",
            labels=["model"],
        )
        rows = HistogramMetricFamily(
            "warmserve_batch_rows", "Rows per batch sent to a worker", labels=["model"]
        )
        warm_up_requests = CounterMetricFamily(
            "warmserve_warm_up_requests",
            "Inference requests before the server turned ready (its own warm-up calls), "
            "by outcome; not in warmserve_requests",
            labels=["model", "code"],
        )
        warm_up_rows = CounterMetricFamily(
            "warmserve_warm_up_batch_rows",
            "Rows sent to workers before the server turned ready; not in warmserve_batch_rows",
            labels=["model"],
        )
        for name, counters in sorted(self._counters.items()):
            c = _NOTHING_YET if counters.warming else counters
            for code, count in sorted(c.outcomes.items()):
                requests.add_metric([name, code], count)
            duration.add_metric(
                [name], _histogram_buckets(LATENCY_BUCKETS, c.duration_buckets), c.duration_sum
            )
            rows.add_metric([name], _histogram_buckets(BATCH_BUCKETS, c.rows_buckets), c.rows_sum)
            warm_up = counters if counters.warming else counters.warm_up
            if warm_up is not None:
                for code, count in sorted(warm_up.outcomes.items()):
                    warm_up_requests.add_metric([name, code], count)
                warm_up_rows.add_metric([name], warm_up.rows_sum)
        return [requests, duration, rows, warm_up_requests, warm_up_rows]


class Metrics:
    def __init__(self, warm_up: bool = False) -> None:
        """``warm_up``: the process warms up before it takes traffic (the server: app.py), and
        what it counts until warm_up_over() (or each model's counters' reset()) is warm-up."""
        self.registry = CollectorRegistry()
        self._counters: dict[str, ModelCounters] = {}
        self._warming = warm_up
        self.registry.register(CountersCollector(self._counters))

    def counters(self, model: str) -> ModelCounters:
        """The counters of ``model`` (shared by its versions, as the ``model`` label is)."""
        counters = self._counters.get(model)
        if counters is None:
            counters = self._counters[model] = ModelCounters(warming=self._warming)
        return counters

    def warm_up_over(self) -> None:
        """The server takes traffic now: every model's counting from here on is user traffic
        (a model not ready at the warm-up's end included; a model loaded later has none)."""
        self._warming = False
        for counters in self._counters.values():
            counters.reset()

    def forget(self, model: str) -> None:
        """Drop ``model``'s series: it is no longer loaded (each model ever loaded and unloaded
        would otherwise stay in every scrape; loaded again, it starts from zero)."""
        self._counters.pop(model, None)

    def watch(self, source: Callable[[], Iterable[tuple[str, int, int, int]]]) -> None:
        self.registry.register(ModelGauges(source))

    def watch_inflight(self, source: Callable[[], tuple[int, int]]) -> None:
        self.registry.register(InflightGauges(source))

    def watch_cpu_limit(self, source: Callable[[], LimitStat | None]) -> None:
        self.registry.register(CpuLimitGauges(source))


class RelayCollector(Collector):
    """Calls answered per relay (how evenly connections spread), relay restarts, hangs and
    recycles."""

    def __init__(
        self,
        calls: dict[int, int],
        restarts: list[int],
        ring_calls: dict[int, int] | None = None,
        hangs: list[int] | None = None,
        recycles: list[int] | None = None,
    ) -> None:
        self._calls = calls
        self._restarts = restarts
        self._ring_calls = ring_calls if ring_calls is not None else {}
        self._hangs = hangs if hangs is not None else []
        self._recycles = recycles if recycles is not None else []

    def collect(self) -> Iterable[Metric]:
        def per_relay(name: str, text: str, counts: Iterable[tuple[int, int]]) -> Metric:
            family = CounterMetricFamily(name, text, labels=["relay"])
            for relay, count in counts:
                family.add_metric([str(relay)], count)
            return family

        return [
            per_relay(
                "warmserve_relay_calls",
                "gRPC calls answered through each relay",
                sorted(self._calls.items()),
            ),
            per_relay(
                "warmserve_relay_restarts",
                "Relay processes restarted after exiting",
                enumerate(self._restarts),
            ),
            per_relay(
                "warmserve_relay_ring_calls",
                "ModelInfer calls whose tensors came through the relay's shared memory",
                sorted(self._ring_calls.items()),
            ),
            per_relay(
                "warmserve_relay_hangs",
                "Relay processes killed because they stopped answering the hub (relay_hang_s)",
                enumerate(self._hangs),
            ),
            per_relay(
                "warmserve_relay_recycles",
                "Relay processes replaced because their memory passed relay_max_memory_mib",
                enumerate(self._recycles),
            ),
        ]
