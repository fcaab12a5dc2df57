"""The dynamic batcher: one per model version.

Requests wait in a bounded FIFO. Whenever the pool has a warm worker with room, the batcher takes
the oldest request and every later one of the same signature (non-batch shapes) that still fits in
``max_batch_size`` rows. With ``max_queue_delay_us > 0`` it holds a batch that is not yet full until
its oldest request has waited that long. Requests whose deadline has passed, or whose caller has
gone, are dropped before dispatch: they are never computed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from serve.batching.merge import Array, Signature, merge, signature, split
from serve.errors import (
    DeadlineExceededError,
    ModelExecutionError,
    QueueFullError,
    WorkerLostError,
)

log = logging.getLogger(__name__)

RETRY_WAIT_S = 30.0  # longest a retried batch without a deadline waits for another worker


@dataclass(slots=True)
class BatchResult:
    outputs: list[Array]
    timings_ns: dict[str, int] = field(default_factory=dict)  # phases of the batch, in ns
    worker: str = ""  # which worker ran it


class WorkerLease(Protocol):
    """Room for one batch on one warm worker, held from acquire() until run() ends or release()."""

    async def run(self, inputs: list[Array], rows: int) -> BatchResult: ...

    def release(self) -> None: ...


class BatchExecutor(Protocol):
    async def acquire(self) -> WorkerLease: ...

    def acquire_now(self) -> WorkerLease | None:
        """A lease at once if some worker has room, else None."""
        ...


class BatchObserver(Protocol):
    """Told about every dispatched batch (statistics); must not raise."""

    def batch_done(
        self, rows: int, requests: int, queue_ns: Sequence[int], result: BatchResult | None
    ) -> None: ...


@dataclass(slots=True, eq=False)
class _Pending:
    inputs: list[Array]
    rows: int
    signature: Signature
    deadline: float | None
    enqueued: float
    future: asyncio.Future[list[Array]]


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        executor: BatchExecutor,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int,
        observer: BatchObserver | None = None,
    ) -> None:
        self._name = name
        self._executor = executor
        self._max_rows = max(1, max_batch_size)
        self._batching = max_batch_size > 0
        self._delay_s = max_queue_delay_us / 1e6
        self._max_queue = max_queue_size
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._arrival = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._dispatch_loop(), name=f"batcher:{self._name}")

    async def stop(self) -> None:
        """Stop dispatching; fail what is still queued; wait for batches already running."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(QueueFullError(f"model {self._name!r} is shutting down"))
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    async def drain(self) -> None:
        """Return once nothing is queued or running (callers stop sending first)."""
        while self._queue or self._batches:
            if self._batches:
                await asyncio.wait(list(self._batches))
            else:  # queued requests wait for a worker slot: look again shortly
                await asyncio.sleep(0.005)

    async def submit(self, inputs: list[Array], rows: int, deadline: float | None) -> list[Array]:
        """Queue one request (inputs in model order) and wait for its own rows of every output."""
        if len(self._queue) >= self._max_queue:
            raise QueueFullError(
                f"model {self._name!r} has {len(self._queue)} requests queued (the limit); "
                "retry later or add workers"
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceededError(f"request to {self._name!r} arrived after its deadline")
        item = _Pending(
            inputs=inputs,
            rows=rows,
            signature=signature(inputs) if self._batching else (),
            deadline=deadline,
            enqueued=now,
            future=asyncio.get_running_loop().create_future(),
        )
        lease = None if self._queue or self._delay_s else self._executor.acquire_now()
        job: Awaitable[object]
        if lease is not None:
            # Idle: nothing waits and a worker has room, so this request is the batch the
            # dispatch loop would form; run it from here and skip the loop's task hops.
            job = self._execute(lease, [item])
        else:
            self._queue.append(item)
            self._arrival.set()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("model %s: request queued (%d waiting)", self._name, len(self._queue))
            job = item.future
        if deadline is None:
            await job
            return item.future.result()
        try:
            async with asyncio.timeout(deadline - now):
                await job
                return item.future.result()
        except TimeoutError:
            raise DeadlineExceededError(
                f"request to {self._name!r} did not finish within its deadline "
                f"({(deadline or now) - now:.3f} s)"
            ) from None

    async def _dispatch_loop(self) -> None:
        while True:
            while not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
            lease = await self._executor.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                lease.release()
                raise
            if not batch:
                lease.release()
                continue
            task = asyncio.create_task(self._execute(lease, batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _drop_dead(self) -> None:
        """Remove callers that gave up and requests whose deadline has passed."""
        now = time.monotonic()
        if not any(
            i.future.done() or (i.deadline is not None and i.deadline <= now) for i in self._queue
        ):
            return
        alive: deque[_Pending] = deque()
        for item in self._queue:
            if item.future.done():
                continue
            if item.deadline is not None and item.deadline <= now:
                item.future.set_exception(
                    DeadlineExceededError(f"request to {self._name!r} expired while queued")
                )
                continue
            alive.append(item)
        self._queue = alive

    async def _collect(self) -> list[_Pending]:
        """The next batch: the oldest request plus later ones of its signature that fit."""
        while True:
            self._drop_dead()
            if not self._queue:
                return []
            head = self._queue[0]
            if not self._batching:
                return [self._queue.popleft()]
            group_rows = sum(i.rows for i in self._queue if i.signature == head.signature)
            wait = head.enqueued + self._delay_s - time.monotonic()
            if group_rows >= self._max_rows or wait <= 0:
                return self._take(head.signature)
            self._arrival.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._arrival.wait()
            except TimeoutError:
                pass

    def _take(self, sig: Signature) -> list[_Pending]:
        taken: list[_Pending] = []
        kept: deque[_Pending] = deque()
        rows = 0
        full = False
        for item in self._queue:
            if not full and item.signature == sig and rows + item.rows <= self._max_rows:
                taken.append(item)
                rows += item.rows
            else:
                # FIFO within a signature: once one does not fit, later ones wait too.
                full = full or item.signature == sig
                kept.append(item)
        self._queue = kept
        return taken

    async def _execute(self, lease: WorkerLease, batch: list[_Pending]) -> None:
        start = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):
            rows = sum(i.rows for i in batch)
            log.debug(
                "model %s: dispatching %d rows from %d requests", self._name, rows, len(batch)
            )
        queue_ns = [int((start - i.enqueued) * 1e9) for i in batch]
        row_counts = [i.rows for i in batch]
        result: BatchResult | None = None
        try:
            inputs = merge([i.inputs for i in batch])
            try:
                result = await lease.run(inputs, sum(row_counts))
            except WorkerLostError as exc:
                result = await self._retry(batch, inputs, sum(row_counts), exc)
            parts = split(result.outputs, row_counts)
        except ValueError as exc:
            self._fail(
                batch, ModelExecutionError(f"model {self._name!r} returned bad outputs: {exc}")
            )
        except Exception as exc:
            self._fail(batch, exc)
        else:
            for item, part in zip(batch, parts, strict=True):
                if not item.future.done():
                    item.future.set_result(part)
        finally:
            if self._observer is not None:
                self._observer.batch_done(sum(row_counts), len(batch), queue_ns, result)

    async def _retry(
        self, batch: list[_Pending], inputs: list[Array], rows: int, lost: WorkerLostError
    ) -> BatchResult:
        """Run a batch whose worker died once more on another worker, if its callers can wait.

        Inference is idempotent, so a second run is safe; a second loss is final.
        """
        live = [i for i in batch if not i.future.done()]
        deadlines = [i.deadline for i in live if i.deadline is not None]
        budget = min(deadlines) - time.monotonic() if deadlines else RETRY_WAIT_S
        if not live or budget <= 0:
            raise lost
        log.warning("model %s: %s; retrying its batch of %d rows once", self._name, lost, rows)
        try:
            async with asyncio.timeout(min(budget, RETRY_WAIT_S)):
                lease = await self._executor.acquire()
        except TimeoutError:
            raise lost from None
        return await lease.run(inputs, rows)

    @staticmethod
    def _fail(batch: list[_Pending], exc: Exception) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)
