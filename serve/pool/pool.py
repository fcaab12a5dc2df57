"""The worker pool of one model version: keeps ``target`` warm workers, routes batches to them.

A worker takes traffic only once it has reported warm (every batch bucket run). ``acquire_now()``
picks the warm worker with the most free batch slots; it never returns a cold or draining one.
Dead workers are replaced at once (with back-off after failed starts). ``replace()`` starts a
new worker first and retires the old one only when the new one is warm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from serve.batching import BatchResult
from serve.batching.batcher import BatchCallback
from serve.batching.merge import Array
from serve.config import ModelConfig
from serve.cpus import available_cpus
from serve.errors import ModelFaultError, ModelNotReadyError
from serve.pool.template import TemplateError, WorkerTemplate
from serve.pool.worker_handle import WorkerHandle, WorkerSettings, WorkerState
from serve.protocol.datatypes import Datatype, element_size

log = logging.getLogger(__name__)

MIN_SLOT_BYTES = 1 << 20
VARIABLE_SLOT_BYTES = 64 << 20  # memory files are sparse: unused bytes cost no memory
RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
DRAIN_TIMEOUT_S = 30.0


def slot_bytes_for(model: ModelConfig) -> int:
    """Shared memory per batch and direction: the largest batch's tensors, with headroom."""
    if model.pool.shm_slot_bytes:
        return model.pool.shm_slot_bytes
    rows = max(1, model.max_batch_size)
    total = 0
    for spec in (*model.inputs, *model.outputs):
        size = element_size(Datatype(spec.datatype))
        if size == 0 or any(d < 0 for d in spec.shape):
            return VARIABLE_SLOT_BYTES
        count = rows
        for d in spec.shape:
            count *= d
        total += count * size + 64
    return max(MIN_SLOT_BYTES, 2 * total)


class Lease:
    """One reserved batch slot on one warm worker."""

    __slots__ = ("_slot", "worker")

    def __init__(self, worker: WorkerHandle, slot: int) -> None:
        self.worker = worker
        self._slot: int | None = slot

    def start(self, parts: Sequence[Sequence[Array]], rows: int, done: BatchCallback) -> None:
        slot, self._slot = self._slot, None
        assert slot is not None, "lease already used"
        self.worker.submit(slot, parts, rows, done)

    async def run(self, inputs: list[Array], rows: int) -> BatchResult:
        slot, self._slot = self._slot, None
        assert slot is not None, "lease already used"
        return await self.worker.run(slot, inputs, rows)

    def release(self) -> None:
        if self._slot is not None:
            slot, self._slot = self._slot, None
            self.worker.release(slot)


class WorkerPool:
    def __init__(
        self,
        model: ModelConfig,
        *,
        log_level: str = "INFO",
        require_gpu: bool = False,
        on_change: Callable[[], None] | None = None,
        bundle_id: str = "",
    ) -> None:
        self.model = model
        self.target = model.pool.workers
        # the CPUs this process may use (affinity, the container's CPU limit), not the node's
        threads = model.pool.threads or max(1, available_cpus() // model.pool.workers)
        self._settings = WorkerSettings(
            device=model.device,
            require_gpu=require_gpu,
            threads=threads,
            slots=model.pool.max_inflight_per_worker,
            slot_bytes=slot_bytes_for(model),
            startup_timeout_s=model.pool.startup_timeout_s,
            watchdog_s=model.pool.watchdog_s,
            log_level=log_level,
            bundle_id=bundle_id,
        )
        self._notify = on_change or (lambda: None)
        self._workers: list[WorkerHandle] = []
        self._changed = asyncio.Event()
        self._stopping = False
        self._serial = 0
        self._failures = 0  # worker starts in a row that failed (or died before an answer)
        self._failed_at = 0.0  # monotonic time of the latest of them
        self._last_start_error = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._template: WorkerTemplate | None = None
        self._seen_warm: set[str] = set()
        self._states: dict[str, tuple[WorkerState, bool]] = {}
        self._retire_scheduled: set[WorkerHandle] = set()
        self._listeners: list[Callable[[], None]] = []

    @property
    def settings(self) -> WorkerSettings:
        """What each worker of this pool starts with (device, intra-op threads, slots)."""
        return self._settings

    @property
    def workers(self) -> list[WorkerHandle]:
        return list(self._workers)

    def warm_workers(self) -> list[WorkerHandle]:
        return [w for w in self._workers if w.state is WorkerState.WARM and not w.draining]

    @property
    def warm_count(self) -> int:
        return len(self.warm_workers())

    def has_warm(self) -> bool:
        """At least one warm worker taking traffic (cheaper than warm_count on the request path)."""
        for worker in self._workers:
            if worker.state is WorkerState.WARM and not worker.draining:
                return True
        return False

    def _counted(self) -> int:
        """Workers that count toward the target: starting or warm, not being retired."""
        return sum(
            1
            for w in self._workers
            if w.state in (WorkerState.STARTING, WorkerState.WARM)
            and not (w.draining or w.retiring)
        )

    def _new_handle(self) -> WorkerHandle:
        self._serial += 1
        handle = WorkerHandle(
            self.model,
            f"{self.model.name}#{self._serial}",
            self._settings,
            self._on_change,
            self._template,
            self._slot_freed,
        )
        self._workers.append(handle)
        return handle

    async def start(self) -> None:
        """Start ``workers`` workers; return once ``min_warm`` of them are warm (the others go
        on warming up in the background: one that hangs there must not hold the model's
        readiness until its start-up timeout) or once every start ended with at least one
        warm; else raise the reason."""
        if self.model.pool.worker_start == "template":
            template = WorkerTemplate(
                self.model.backend, self.model.name, self.model.pool.startup_timeout_s
            )
            try:
                await template.start()
                self._template = template
            except TemplateError as exc:
                log.warning("model %s: %s; spawning workers directly", self.model.name, exc)
        handles = [self._new_handle() for _ in range(self.target)]
        starts = [asyncio.ensure_future(h.start()) for h in handles]
        floor = min(self.model.pool.warm_floor, len(starts))
        pending = set(starts)
        try:
            while pending and self.warm_count < floor:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (the server stops while warming up)
            for start in pending:
                start.cancel()
            raise
        for start in pending:  # owned by the pool from here on, as its other starts are
            self._spawn(self._finish_start(start), starting=True)
        ended = [s for s in starts if s.done() and not s.cancelled()]
        failures = [e for s in ended if (e := s.exception()) is not None]
        for failure in failures:
            if not isinstance(failure, Exception):
                raise failure
        self._seen_warm.update(w.worker_id for w in self.warm_workers())
        if self.warm_count == 0:
            why = failures[0] if failures else "its workers died as they warmed up"
            # every start failed in the model itself: another start would fail the same way
            faults = failures and all(isinstance(f, ModelFaultError) for f in failures)
            failed = ModelFaultError if faults else ModelNotReadyError
            raise failed(f"model {self.model.name!r}: no worker warmed up: {why}")
        self._reconcile()

    def acquire_now(self, worker: WorkerHandle | None = None) -> Lease | None:
        """A lease on ``worker`` (or the least busy warm worker) if one has a free slot now."""
        if worker is None and len(self._workers) == 1:
            worker = self._workers[0]
        candidates = [worker] if worker is not None else self._workers
        best = max(candidates, key=lambda w: w.free_slots, default=None)
        if best is None or best.free_slots <= 0:
            return None
        return Lease(best, best.reserve())

    async def acquire_next(self, worker: WorkerHandle, timeout_s: float) -> Lease | None:
        """A lease on ``worker``'s next free slot, ahead of the live batches waiting for one
        (a probe of a worker whose live batches fail); None if no slot frees within
        ``timeout_s``. Raises WorkerLostError if the worker dies first."""
        slot = await worker.next_slot(timeout_s)
        return None if slot is None else Lease(worker, slot)

    def on_slot_free(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a slot frees or a worker's state changes."""
        self._listeners.append(callback)

    def unavailable(self) -> str:
        """Why no worker can take a batch now, or "" when one is warm or on its way. Between
        failed starts (a back-off) none is on its way: requests then fail UNAVAILABLE instead of
        queueing for as long as the starts keep failing (a caller without a deadline forever)."""
        if self._stopping:
            return "its workers are stopping"
        if self._counted() == 0:
            trouble = self.start_trouble()
            if trouble:
                return f"no warm worker: {trouble}"
            if not self._tasks:
                return "no warm worker and none starting"
        return ""

    def start_trouble(self) -> str:
        """Why worker starts keep failing, or "" once a worker started since has answered."""
        if not self._failures or self._recovered(self._workers):
            return ""
        return (
            f"the last {self._failures} worker start(s) failed ({self._last_start_error}); "
            "the pool keeps retrying"
        )

    def _recovered(self, workers: list[WorkerHandle]) -> bool:
        """Whether one of ``workers`` started after the latest failure and has answered a batch:
        the failures are over (a worker started before them proves nothing)."""
        return any(w.last_success and w.started_at > self._failed_at for w in workers)

    def check_watchdog(self) -> None:
        """Kill workers with a batch out longer than ``pool.watchdog_s`` (they hang)."""
        now = time.monotonic()
        for worker in list(self._workers):
            worker.check_watchdog(now)

    def _slot_freed(self) -> None:
        self._changed.set()
        for listener in self._listeners:
            listener()

    def _on_change(self, worker: WorkerHandle) -> None:
        self._changed.set()
        for listener in self._listeners:
            listener()
        state = (worker.state, worker.draining)
        if self._states.get(worker.worker_id) == state:
            return  # a slot came free: nothing readiness depends on changed
        if worker.state is WorkerState.DEAD:  # (told once): nothing of it to remember
            self._states.pop(worker.worker_id, None)
            self._seen_warm.discard(worker.worker_id)
        else:
            self._states[worker.worker_id] = state
        if worker.state is WorkerState.DEAD and worker in self._workers:
            self._workers.remove(worker)
            self._retire_scheduled.discard(worker)
            self._count_early_death(worker)
            self._reconcile()
        elif worker.state is WorkerState.WARM and worker.worker_id not in self._seen_warm:
            self._seen_warm.add(worker.worker_id)  # newly warm: a replacement may now retire
            self._retire_one_replaced()
        self._notify()

    def _count_early_death(self, worker: WorkerHandle) -> None:
        """A warm worker that dies before it answered a single batch (its first probe, say)
        failed its start as much as one that dies warming up: the next start waits out the
        back-off. Otherwise a model that crashes its worker on every batch is restarted in a
        tight loop, forever."""
        if self._recovered([worker]):
            self._failures = 0  # it served: its death ends nothing but itself
        if (
            self._stopping
            or worker.ready is None  # (a failed start: _start_one counts it)
            or worker.last_success
            or worker.draining
            or worker.retiring
        ):
            return
        self._failures += 1
        self._failed_at = time.monotonic()
        self._last_start_error = (
            f"worker {worker.worker_id} died before it answered a batch: {worker.lost_reason}"
        )
        log.error(
            "model %s: %s (%d failed start(s) in a row)",
            self.model.name,
            self._last_start_error,
            self._failures,
        )

    def scale_to(self, target: int, reason: str) -> None:
        """Change the number of workers kept (clamped to the configured floor and ceiling)."""
        pool = self.model.pool
        target = max(pool.warm_floor, min(pool.worker_ceiling, target))
        if target == self.target:
            return
        log.info("model %s: %d → %d workers (%s)", self.model.name, self.target, target, reason)
        self.target = target
        surplus = self._counted() - target
        idle_first = sorted(self.warm_workers(), key=lambda w: (w.busy, -self._workers.index(w)))
        for worker in idle_first[: max(0, surplus)]:
            self._spawn(self.retire(worker, reason))
        self._reconcile()

    def replace(self, worker: WorkerHandle, reason: str, *, stop_routing: bool) -> None:
        """Start a replacement for ``worker``; retire it once the replacement is warm.

        With ``stop_routing`` the worker takes no new batches from now on (it failed probes);
        otherwise it keeps serving until its replacement is warm (it is merely slow).
        """
        if worker.retiring or worker.state is WorkerState.DEAD:
            return
        log.warning("model %s: replacing worker %s: %s", self.model.name, worker.worker_id, reason)
        worker.retiring = True
        worker.draining = stop_routing
        self._reconcile()

    def _retire_one_replaced(self) -> None:
        for worker in self._workers:
            if worker.retiring and worker not in self._retire_scheduled:
                self._spawn(self.retire(worker, "replaced"))
                return

    async def retire(self, worker: WorkerHandle, reason: str) -> None:
        """Drain ``worker`` (no new batches, in-flight ones finish), then stop it."""
        self._retire_scheduled.add(worker)
        worker.draining = True
        self._notify()
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                while worker.busy and worker.state is WorkerState.WARM:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            log.warning(
                "worker %s still busy after %.0f s; stopping it", worker.worker_id, DRAIN_TIMEOUT_S
            )
        log.info("model %s: retiring worker %s (%s)", self.model.name, worker.worker_id, reason)
        if worker.probe_failures or worker.state is not WorkerState.WARM:
            await worker.kill()  # it may hang: don't wait for a polite exit
        else:
            await worker.stop()

    def _reconcile(self) -> None:
        """Start workers until the target is met (after a back-off if starts keep failing)."""
        if self._stopping:
            return
        missing = self.target - self._counted() - len(self._tasks_starting)
        for _ in range(max(0, missing)):
            self._spawn(self._start_one(), starting=True)

    @property
    def _tasks_starting(self) -> list[asyncio.Task[None]]:
        return [t for t in self._tasks if t.get_name().startswith("start:")]

    def _spawn(self, coro: Coroutine[Any, Any, None], *, starting: bool = False) -> None:
        name = f"{'start' if starting else 'retire'}:{self.model.name}"
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("model %s: pool task failed", self.model.name, exc_info=task.exception())
        self._changed.set()
        if task.get_name().startswith("start:"):
            self._reconcile()  # a failed start is retried (after its back-off)

    async def _start_one(self) -> None:
        if self._failures and self._recovered(self._workers):
            self._failures = 0
        delay = RESTART_BACKOFF_S[min(self._failures, len(RESTART_BACKOFF_S) - 1)]
        if delay:
            log.info("model %s: next worker start in %.1f s (back-off)", self.model.name, delay)
            await asyncio.sleep(delay)
        if self._stopping:
            return
        handle = self._new_handle()
        try:
            await handle.start()
        except Exception as exc:
            self._start_failed(exc)
            if handle in self._workers:
                self._workers.remove(handle)
            self._slot_freed()  # the batcher looks again: requests waiting for it now fail
        self._notify()

    async def _finish_start(self, start: asyncio.Future[None]) -> None:
        """A worker of the pool's first start still warming up when the pool was ready."""
        try:
            await start
        except Exception as exc:
            self._start_failed(exc)
            self._slot_freed()  # the batcher looks again
        self._notify()

    def _start_failed(self, exc: Exception) -> None:
        self._failures += 1
        self._failed_at = time.monotonic()
        self._last_start_error = str(exc)
        log.error("model %s: worker start failed: %s", self.model.name, exc)

    async def stop(self) -> None:
        self._stopping = True
        self._changed.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = list(self._workers)  # (a worker that exits leaves the list)
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        if self._template is not None:
            await self._template.stop()
        log.info("model %s: %d workers stopped", self.model.name, len(workers))
