"""The warm-pool controller: probes workers, replaces failing, hung or slow ones, and scales the
pool between ``min_warm`` and ``max_workers`` on P95 latency and queue depth.

While the process's CPU limit stops it (its CFS quota spent: serve/cpus.py), every worker's
latency carries the kernel's pauses: a worker over the latency budget then is not counted slow,
because a new one would wait just the same and its cold start would cost more CPU. For the same
reason the pool does not grow then: another worker shares the same quota, so it adds no capacity
(its start-up and warm-up spend the quota the live traffic is short of); the way out is a higher
CPU limit or more replicas, which the log line says."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from serve.config import ModelConfig
from serve.cpus import ThrottleWatch, throttle_watch
from serve.pool.pool import WorkerPool
from serve.pool.worker_handle import WorkerHandle
from serve.readiness.latency import ModelLatency
from serve.readiness.probe import Prober, ProbeResult

log = logging.getLogger(__name__)

LATENCY_LOG_S = 60.0
SLOW_TICKS = 5  # consecutive ticks a worker's P95 must exceed the budget to be replaced
MIN_SAMPLES = 10  # samples a window needs before latency decisions are taken on it
DECISION_WINDOW_S = 5.0  # scaling and slowness look at this recent slice of the windows


class WarmPoolController:
    def __init__(
        self,
        model: ModelConfig,
        pool: WorkerPool,
        latency: ModelLatency,
        queue_depth: Callable[[], int],
        on_change: Callable[[], None],
        throttle: ThrottleWatch | None = None,
    ) -> None:
        """``throttle``: the process's CPU limit; by default cpus.throttle_watch()."""
        self.model = model
        self.pool = pool
        self.latency = latency
        self._throttle = throttle_watch() if throttle is None else throttle
        self._throttle_said = False  # the current throttled stretch's log line was written
        self._scale_held_said = False  # ... and its "not scaling up" line
        self.prober = Prober(model, pool, self._throttle)
        self._queue_depth = queue_depth
        self._on_change = on_change
        self._tick_s = min(1.0, model.probe.interval_s)
        self._task: asyncio.Task[None] | None = None
        self._last_probe = 0.0
        self._last_log = time.monotonic()
        self._over_since: float | None = None
        self._under_since: float | None = None
        self._slow_ticks: dict[str, int] = {}
        self._kicked = asyncio.Event()
        self.last_failure = ""  # the latest failed probe, for the reason readiness gives

    def healthy_workers(self) -> list[WorkerHandle]:
        """Warm workers that passed their latest probe."""
        return [w for w in self.pool.warm_workers() if w.probed_ok]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"controller:{self.model.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def kick(self) -> None:
        """Tick now rather than at the next period (a worker turned warm, or died)."""
        self._kicked.set()

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._tick_s):  # the controller's period
                    await self._kicked.wait()
            except TimeoutError:
                pass
            self._kicked.clear()
            try:
                await self.tick()
            except Exception:
                log.exception("model %s: controller tick failed", self.model.name)

    async def tick(self) -> None:
        self.pool.check_watchdog()
        now = time.monotonic()
        due = now - self._last_probe >= self.model.probe.interval_s
        unprobed = [
            w
            for w in self.pool.warm_workers()
            if not w.retiring and (not w.probed_ok or self._failing_live(w))
        ]
        if due or unprobed:
            await self.probe_all(only=None if due else unprobed)
        self._check_slow_workers()
        self._scale(now)
        if now - self._last_log >= LATENCY_LOG_S:
            self._last_log = now
            log.info("model %s: %s", self.model.name, self.latency.summary())

    def _failing_live(self, worker: WorkerHandle) -> bool:
        """Whether ``worker``'s live batches failed in the model ``failures_to_replace`` times in
        a row: it is probed now, not at the next period, and the probe (known-good inputs)
        decides. Failures alone never replace it: bad client data that the model chokes on
        fails batches on a healthy worker too, and its probe passes."""
        count = worker.failed_in_a_row
        if count < self.model.probe.failures_to_replace:
            return False
        log.warning(
            "worker %s: its last %d batches failed in the model (latest: %s); probing it now",
            worker.worker_id,
            count,
            worker.last_batch_error,
        )
        return True

    async def probe_all(self, only: list[WorkerHandle] | None = None) -> None:
        """Probe every warm worker (or ``only`` these) concurrently and act on the results."""
        self._last_probe = time.monotonic()
        workers = only if only is not None else self.pool.warm_workers()
        results = await asyncio.gather(*(self.prober.probe(w) for w in workers))
        for worker, result in zip(workers, results, strict=True):
            self._record(worker, result)
        self._on_change()

    def _record(self, worker: WorkerHandle, result: ProbeResult | None) -> None:
        if result is None:  # busy with live traffic: recent live successes stand in for a probe
            if time.monotonic() - worker.last_success <= self.model.probe.interval_s:
                worker.probed_ok = True
                worker.probe_failures = 0
            return
        if result.ok:
            if not worker.probed_ok:
                log.info(
                    "worker %s passed its probe (%.1f ms)", worker.worker_id, result.latency_s * 1e3
                )
            worker.probed_ok = True
            worker.probe_failures = 0
            return
        worker.probed_ok = False
        worker.probe_failures += 1
        self.last_failure = f"worker {worker.worker_id}: {result.reason}"
        log.warning(
            "worker %s failed its probe (%d in a row): %s",
            worker.worker_id,
            worker.probe_failures,
            result.reason,
        )
        if worker.probe_failures >= self.model.probe.failures_to_replace:
            self.pool.replace(
                worker, f"failed {worker.probe_failures} probes: {result.reason}", stop_routing=True
            )

    def _check_slow_workers(self) -> None:
        budget = self.model.latency_budget_ms
        if not budget:
            return
        counted, self._slow_ticks = self._slow_ticks, {}  # warm workers only: none long gone
        throttled = self._throttle.throttled_within(DECISION_WINDOW_S)
        if not throttled:
            self._throttle_said = False
        for worker in self.pool.warm_workers():
            stats = self.latency.worker(worker.worker_id).percentiles(last_s=DECISION_WINDOW_S)
            slow = stats.count >= MIN_SAMPLES and stats.p95_ms > budget
            if slow and throttled:
                if not self._throttle_said:
                    self._throttle_said = True
                    log.info(
                        "model %s: worker %s P95 %.1f ms, over the %g ms budget, while the CPU "
                        "limit stops this server: not counted slow (a new worker would wait "
                        "just the same)",
                        self.model.name,
                        worker.worker_id,
                        stats.p95_ms,
                        budget,
                    )
                slow = False
            ticks = counted.get(worker.worker_id, 0) + 1 if slow else 0
            self._slow_ticks[worker.worker_id] = ticks
            if ticks >= SLOW_TICKS and not worker.retiring:
                self.pool.replace(
                    worker,
                    f"P95 {stats.p95_ms:.1f} ms over the {budget:g} ms budget for {ticks} s",
                    stop_routing=False,
                )

    def _scale(self, now: float) -> None:
        target_ms = self.model.pool.p95_target_ms
        if not target_ms:
            return
        e2e = self.latency.end_to_end.percentiles(now, last_s=DECISION_WINDOW_S)
        depth = self._queue_depth()
        over = (e2e.count >= MIN_SAMPLES and e2e.p95_ms > target_ms) or depth > max(
            1, self.model.max_batch_size
        )
        under = depth == 0 and (e2e.count < MIN_SAMPLES or e2e.p95_ms < target_ms / 2)
        self._over_since = (self._over_since or now) if over else None
        self._under_since = (self._under_since or now) if under else None
        pool = self.model.pool
        if over and self._throttle.throttled_within(DECISION_WINDOW_S):
            self._over_since = None  # the hold time starts again once the limit lets go
            if not self._scale_held_said and self.pool.target < pool.worker_ceiling:
                self._scale_held_said = True
                log.warning(
                    "model %s: P95 %.1f ms / queue %d over target, but the CPU limit stops this "
                    "server: not adding a worker (it would share the same limit and its start "
                    "would spend more of it); raise the CPU limit or add replicas",
                    self.model.name,
                    e2e.p95_ms,
                    depth,
                )
        elif over:
            self._scale_held_said = False
        if self._over_since is not None and now - self._over_since >= pool.scale_up_after_s:
            self._over_since = None
            self.pool.scale_to(
                self.pool.target + 1, f"P95 {e2e.p95_ms:.1f} ms / queue {depth} over target"
            )
        elif self._under_since is not None and now - self._under_since >= pool.scale_down_after_s:
            self._under_since = None
            self.pool.scale_to(self.pool.target - 1, "quiet: back toward min_warm")
