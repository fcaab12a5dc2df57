"""The worker pool of one model version: starts warm workers, routes batches, replaces the dead.

A worker takes traffic only once it has reported warm (every batch bucket run). ``acquire()``
picks the warm worker with the most free batch slots; it never returns a cold one.
"""

from __future__ import annotations

import asyncio
import logging
import os

from serve.batching import BatchResult
from serve.batching.merge import Array
from serve.config import ModelConfig
from serve.errors import ModelNotReadyError
from serve.pool.worker_handle import WorkerHandle, WorkerSettings, WorkerState
from serve.protocol.datatypes import Datatype, element_size

log = logging.getLogger(__name__)

MIN_SLOT_BYTES = 1 << 20
VARIABLE_SLOT_BYTES = 64 << 20  # memory files are sparse: unused bytes cost no memory
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


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

    def __init__(self, worker: WorkerHandle, slot: int) -> None:
        self._worker = worker
        self._slot: int | None = slot

    async def run(self, inputs: list[Array], rows: int) -> BatchResult:
        slot = self._slot
        assert slot is not None, "lease already used"
        try:
            return await self._worker.run(slot, inputs, rows)
        finally:
            self.release()

    def release(self) -> None:
        if self._slot is not None:
            slot, self._slot = self._slot, None
            self._worker.release(slot)


class WorkerPool:
    def __init__(self, model: ModelConfig, *, log_level: str = "INFO") -> None:
        self.model = model
        workers = model.pool.workers
        threads = model.pool.threads or max(1, (os.cpu_count() or 1) // workers)
        self._settings = WorkerSettings(
            device=model.device,
            threads=threads,
            slots=model.pool.max_inflight_per_worker,
            slot_bytes=slot_bytes_for(model),
            startup_timeout_s=model.pool.startup_timeout_s,
            log_level=log_level,
        )
        self._workers: list[WorkerHandle] = []
        self._changed = asyncio.Event()
        self._stopping = False
        self._serial = 0
        self._failures = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def workers(self) -> list[WorkerHandle]:
        return list(self._workers)

    @property
    def warm_count(self) -> int:
        return sum(1 for w in self._workers if w.state is WorkerState.WARM)

    @property
    def alive_count(self) -> int:
        return sum(1 for w in self._workers if w.state in (WorkerState.WARM, WorkerState.STARTING))

    def _new_handle(self) -> WorkerHandle:
        self._serial += 1
        handle = WorkerHandle(
            self.model, f"{self.model.name}#{self._serial}", self._settings, self._on_change
        )
        self._workers.append(handle)
        return handle

    async def start(self) -> None:
        """Start every worker; succeed when at least one is warm, else raise the first failure."""
        handles = [self._new_handle() for _ in range(self.model.pool.workers)]
        results = await asyncio.gather(*(h.start() for h in handles), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, Exception):
                raise failure
        if self.warm_count == 0:
            raise ModelNotReadyError(
                f"model {self.model.name!r}: no worker warmed up: {failures[0]}"
            )

    async def acquire(self) -> Lease:
        """Wait for a warm worker with a free slot; ModelNotReadyError if none can appear."""
        while True:
            best = max(self._workers, key=lambda w: w.free_slots, default=None)
            if best is not None and best.free_slots > 0:
                return Lease(best, best.reserve())
            if self._stopping or (self.alive_count == 0 and not self._tasks):
                raise ModelNotReadyError(f"model {self.model.name!r} has no warm worker")
            self._changed.clear()
            await self._changed.wait()

    def _on_change(self, worker: WorkerHandle) -> None:
        self._changed.set()
        if worker.state is WorkerState.DEAD and not self._stopping and worker in self._workers:
            self._workers.remove(worker)
            self._schedule_replacement()

    def _schedule_replacement(self) -> None:
        task = asyncio.create_task(self._replace(), name=f"replace:{self.model.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self) -> None:
        delay = RESTART_BACKOFF_S[min(self._failures, len(RESTART_BACKOFF_S) - 1)]
        log.info("model %s: starting a replacement worker in %.1f s", self.model.name, delay)
        await asyncio.sleep(delay)
        if self._stopping:
            return
        handle = self._new_handle()
        try:
            await handle.start()
        except Exception as exc:
            self._failures += 1
            log.error("model %s: replacement worker failed: %s", self.model.name, exc)
            if handle in self._workers:
                self._workers.remove(handle)
            if not self._stopping:
                self._schedule_replacement()
            return
        self._failures = 0

    async def stop(self) -> None:
        self._stopping = True
        self._changed.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self._workers), return_exceptions=True)
        log.info("model %s: %d workers stopped", self.model.name, len(self._workers))
