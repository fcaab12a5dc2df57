"""Rolling latency windows with percentiles: per model and per worker."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

WINDOW_S = 60.0
MAX_SAMPLES = 8192


@dataclass(frozen=True, slots=True)
class Percentiles:
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def __str__(self) -> str:
        if not self.count:
            return "no samples"
        return f"p50 {self.p50_ms:.2f} / p95 {self.p95_ms:.2f} / p99 {self.p99_ms:.2f} ms"


EMPTY = Percentiles(0, 0.0, 0.0, 0.0)


class LatencyWindow:
    """Samples (seconds) from the last ``window_s`` seconds, at most ``max_samples`` of them."""

    def __init__(self, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, seconds: float, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, seconds))

    def clear(self) -> None:
        self._samples.clear()

    def _trim(self, now: float) -> None:
        horizon = now - self._window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def percentiles(self, now: float | None = None, last_s: float | None = None) -> Percentiles:
        """Over the whole window, or only the samples of the last ``last_s`` seconds."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        horizon = now - last_s if last_s is not None else -np.inf
        values = np.fromiter((v for t, v in self._samples if t >= horizon), dtype=np.float64)
        if not len(values):
            return EMPTY
        values *= 1e3
        p50, p95, p99 = np.percentile(values, (50, 95, 99))
        return Percentiles(len(values), float(p50), float(p95), float(p99))


class ModelLatency:
    """End-to-end, queue and compute windows for one model, and a compute window per worker."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.end_to_end = LatencyWindow(window_s)
        self.queue = LatencyWindow(window_s)
        self.compute = LatencyWindow(window_s)
        self.batches = LatencyWindow(window_s)  # one sample per batch: its size in rows
        self.workers: dict[str, LatencyWindow] = {}

    def worker(self, worker_id: str) -> LatencyWindow:
        window = self.workers.get(worker_id)
        if window is None:
            window = self.workers[worker_id] = LatencyWindow(self.window_s)
        return window

    def clear(self) -> None:
        """Forget every sample (the server's own warm-up traffic)."""
        for window in (self.end_to_end, self.queue, self.compute, self.batches):
            window.clear()
        for window in self.workers.values():
            window.clear()

    def forget_worker(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def report(self) -> dict[str, object]:
        """Percentiles of every window, for the HTTP latency endpoint."""

        def as_dict(p: Percentiles) -> dict[str, float]:
            return {"count": p.count, "p50_ms": p.p50_ms, "p95_ms": p.p95_ms, "p99_ms": p.p99_ms}

        return {
            "window_s": self.window_s,
            "end_to_end": as_dict(self.end_to_end.percentiles()),
            "queue": as_dict(self.queue.percentiles()),
            "compute": as_dict(self.compute.percentiles()),
            "batches": self.batches.percentiles().count,
            "workers": {w: as_dict(win.percentiles()) for w, win in sorted(self.workers.items())},
        }

    def summary(self) -> str:
        e2e = self.end_to_end.percentiles()
        batches = self.batches.percentiles()
        return (
            f"{e2e.count} requests, {batches.count} batches in {self.window_s:.0f} s; "
            f"end-to-end {e2e}; queue {self.queue.percentiles()}; "
            f"compute {self.compute.percentiles()}"
        )
