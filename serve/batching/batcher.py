"""The dynamic batcher: one per model version.

Requests wait in a bounded FIFO. Whenever the pool has a warm worker with room, the batcher takes
the oldest request and every later one of the same signature (non-batch shapes) that still fits in
``max_batch_size`` rows. With ``max_queue_delay_us > 0`` it holds a batch that is not yet full until
its oldest request has waited that long. Requests whose deadline has passed, or whose caller has
gone, are dropped before dispatch: they are never computed.

Dispatch is callback-driven, with no task per batch: a request that finds nothing queued is
dispatched from its own call (no loop hop); one that finds others queued waits with them for a
free slot. A batch's reply sets its callers' futures and frees its slot, and a freed slot schedules
one flush for the end of the current event-loop iteration, which sends everything that queued
meanwhile as the next batch.

Holding under load: when the event loop itself is the bottleneck (its thread busy at least
``HOLD_LOAD`` of the time, or busy or waiting for a CPU at least ``HOLD_PRESSED`` of the time: on a
machine with fewer free cores than busy threads the loop's own CPU time stays low while it cannot
keep up), or when the process's CPU limit (a container's CFS quota, serve/cpus.py) stopped it within
the last ``THROTTLE_MEMORY_S`` (and, once so, until it is ``HOLD_HYSTERESIS`` below both lines,
or ``HOLD_HYSTERESIS_KEPT`` while requests still come at ``HOLD_RATE_KEPT`` of the rate that
saturated it, unless its holds found the callers to be a few closed-loop ones, whose rate each
hold slows: holding lowers the load it answers, not the rate), requests reach the batcher one at
a time, each finds a free worker, and every batch is one row: the per-batch costs (the
shared-memory copy, two socket hops, waking the worker) are paid per request by the busiest
thread, and by the machine (or out of the quota). Then a lone request is held until company
arrives or ``HOLD_CAP_S`` passes, which divides those costs by the batch's size at the price of a
few inter-arrival gaps. How much company a hold waits for adapts: it starts at ``HOLD_ROWS``,
doubles each time a hold fills up within the cap (up to ``HOLD_ROWS_MAX`` and max_batch_size), and
halves when the cap passes with only some company.
When holds that waited for more gather, ``HOLD_GATHERED`` times in a row, exactly as many rows as
the last one that filled, those are all the callers there are (a few closed-loop callers, whose next
requests come only after this batch's replies): the target then stays at that many instead of
doubling into the cap every other hold, and probes one row higher after ``HOLD_PROBE_FILLS`` holds
that fill. A request is held only while a worker has a free slot (otherwise it waits, and batches,
in any case). An idle or lightly loaded server never holds, and ``HOLD_MISSES`` holds in a row that
catch nobody (a single closed-loop caller) switch holding off for ``HOLD_BACKOFF_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from serve.batching.merge import Array, Signature, signature, split
from serve.cpus import ThrottleWatch, throttle_watch
from serve.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelExecutionError,
    ModelNotReadyError,
    QueueFullError,
    ServeError,
    WorkerLostError,
)

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 0.01  # a full queue is swept of requests nobody waits for at most this often
RETRY_WAIT_S = 30.0  # longest a retried batch without a deadline waits for another worker
STOP_WAIT_S = 60.0  # longest stop() waits for running batches (the pool's watchdog is 30 s)
HOLD_LOAD = 0.75  # event-loop thread busy fraction from which lone requests are held ...
HOLD_PRESSED = 0.9  # ... or busy-or-waiting-for-a-CPU fraction (LoopLoad.pressed)
HOLD_HYSTERESIS = 0.1  # once saturated, until both fractions are this far below their lines
HOLD_HYSTERESIS_KEPT = 0.25  # ... this far while requests come at HOLD_RATE_KEPT of the rate
HOLD_RATE_KEPT = 0.9  # that saturated the loop (holding lowers the load, not the rate)
HOLD_ROWS = 2  # a held batch leaves once it has this many rows at first ...
HOLD_ROWS_MAX = 8  # ... doubling up to this many while holds fill up within the cap
HOLD_CAP_S = 0.002  # longest hold (the event loop's timers have millisecond resolution)
HOLD_MISSES = 3  # holds in a row that catch no second request switch holding off ...
HOLD_BACKOFF_S = 0.5  # ... for this long
HOLD_PROBE_FILLS = 8  # holds that fill in a row before a lowered ceiling rises by one row
HOLD_GATHERED = 2  # timed-out holds in a row with exactly the last fill's rows: all callers
LOAD_WINDOW_S = 0.05  # the loop's busy fraction is measured over windows this long
THROTTLE_MEMORY_S = 1.0  # a CPU limit's throttling counts as saturation for this long after


# The phases of a batch the pool times, in the order of BatchResult.timings_ns.
PHASES = ("ipc_write", "worker_input", "compute", "worker_output", "round_trip", "ipc_read")


@dataclass(slots=True)
class BatchResult:
    outputs: list[Array]
    timings_ns: tuple[int, ...] = ()  # one per PHASES entry, in ns; () when not timed
    worker: str = ""  # which worker ran it


BatchCallback = Callable[[BatchResult | BaseException], None]


class WorkerLease(Protocol):
    """Room for one batch on one warm worker, held from acquire_now() until start() or release()."""

    def start(self, parts: Sequence[Sequence[Array]], rows: int, done: BatchCallback) -> None:
        """Send one batch: ``parts`` holds each request's inputs (in model order), concatenated
        along the batch axis on the way. ``done`` is called exactly once, later, from the event
        loop, with the result or the error (WorkerLostError when the worker died with it).
        Raises WorkerLostError at once when the worker cannot take the batch."""
        ...

    def release(self) -> None: ...


class BatchExecutor(Protocol):
    def acquire_now(self) -> WorkerLease | None:
        """A lease at once if some worker has room, else None."""
        ...

    def on_slot_free(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a lease may be available again (a slot freed, a worker
        became warm)."""
        ...

    def unavailable(self) -> str:
        """Why no worker can ever take a batch (none warm or starting), or "" when one can."""
        ...


class BatchObserver(Protocol):
    """Told about every dispatched batch (statistics); must not raise. ``queue_ns``: the time
    in the queue of each of the batch's requests that this batch ends (answered or failed for
    good), summed over every wait of a request that ran before (a batch lost with its worker,
    or a merged batch rerun one request at a time); a request that runs again is left out here
    and counted with its last batch, so each request's queue time is counted once."""

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
    lost: WorkerLostError | None = None  # set once the request's batch died with its worker
    retry_until: float = 0.0  # a retried request waits for a worker at most until then
    alone: bool = False  # its merged batch failed: it runs in a batch of its own
    queued_ns: int = 0  # its time in the queue so far, over every wait (a rerun waits again)
    requeued: float = 0.0  # when it was put back in the queue to run again (0: never)


class _Batch:
    """One dispatched batch; its reply arrives through __call__ (the lease's callback)."""

    __slots__ = ("batcher", "items", "row_counts", "rows")

    def __init__(self, batcher: DynamicBatcher, items: list[_Pending], start: float) -> None:
        self.batcher = batcher
        self.items = items
        self.row_counts = [i.rows for i in items]
        self.rows = sum(self.row_counts)
        for item in items:  # (the wait that ends now; a rerun's began when it was requeued)
            item.queued_ns += int((start - (item.requeued or item.enqueued)) * 1e9)

    def __call__(self, outcome: BatchResult | BaseException) -> None:
        try:
            self.batcher._finished(self, outcome)
        except Exception as exc:  # a bug of ours: these callers get INTERNAL, not a hang
            self.batcher._abandon(self, exc)


def run_queue_wait_ns() -> int | None:
    """Nanoseconds the calling thread has waited, runnable, for a CPU (Linux schedstat), or
    None where the kernel does not say."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as stats:
            return int(stats.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


class LoopLoad:
    """The event-loop thread's load over short windows: ``busy``, the fraction of the time it
    ran (its CPU clock), and ``pressed``, the fraction it ran or waited for a CPU to run on
    (``waited_ns``: the thread's run-queue wait so far, or None where unknown; then
    ``pressed`` is ``busy``). ``throttled``: the process's CPU limit (``throttle``; None:
    none) stopped it within the last THROTTLE_MEMORY_S. ``saturated``: busy or pressed is past
    its line (HOLD_LOAD, HOLD_PRESSED), or throttled; once saturated, until both are more than
    HOLD_HYSTERESIS below their lines (and it is not throttled), or HOLD_HYSTERESIS_KEPT below
    them while requests come at HOLD_RATE_KEPT of the rate they came at when it saturated (and
    not from a few closed-loop callers). A loop that must share too few cores with the workers
    and the callers waits for a CPU instead of running: its CPU time stays under HOLD_LOAD while
    requests queue. A throttled process is stopped as a whole, often while its loop sits in
    epoll: neither clock of the loop's own thread shows that it is out of CPU."""

    __slots__ = (
        "_cpu",
        "_requests",
        "_saturated_rate",
        "_since",
        "_throttle",
        "_waited",
        "_waited_ns",
        "busy",
        "pressed",
        "saturated",
        "throttled",
    )

    def __init__(
        self,
        waited_ns: Callable[[], int | None] = run_queue_wait_ns,
        throttle: ThrottleWatch | None = None,
    ) -> None:
        self.busy = 0.0
        self.pressed = 0.0
        self.throttled = False
        self.saturated = False
        self._since = time.monotonic()
        self._cpu = time.thread_time()
        self._requests = 0
        self._saturated_rate = 0.0
        self._waited_ns: Callable[[], int | None] | None = waited_ns
        self._waited: int | None = None  # read at the first sample, on the loop's own thread
        self._throttle = throttle
        if throttle is not None:
            throttle.periods()  # the count the first window starts from

    def sample(self, now: float, requests: int = 0, few_callers: bool = False) -> None:
        """Read the thread's clocks; the batcher calls this every 32nd request, with how many
        requests it has had so far (``requests``), and whether its holds found all the callers
        there are to be a few closed-loop ones (``few_callers``): their rate falls with every
        hold, so it is not kept to the wider margin for them."""
        elapsed = now - self._since
        if elapsed >= LOAD_WINDOW_S:
            cpu = time.thread_time()
            self.busy = (cpu - self._cpu) / elapsed
            self.pressed = self.busy
            if self._waited_ns is not None:
                waited = self._waited_ns()
                if waited is None:  # not on this kernel: stop asking
                    self._waited_ns = None
                elif self._waited is not None:
                    self.pressed += max(0, waited - self._waited) / 1e9 / elapsed
                self._waited = waited
            throttle = self._throttle
            self.throttled = throttle is not None and throttle.throttled_within(
                THROTTLE_MEMORY_S, now
            )
            # Holding itself lowers the load it answers (a held batch's rows share one batch's
            # costs, and the loop waits for company): judged on the same lines, a loop that holds
            # dips under them every few windows and dispatches its lone requests one by one until
            # it is saturated again. So it leaves only once clearly below them, and further below
            # while requests still come about as fast as when it saturated: holding lowers the
            # load of a request, not how many come. (An open loop at 2,500 calls/s on the 2-vCPU
            # dev VM: a loop that held ran 0.5-0.65 busy and, with the plain margin alone, left
            # saturation in 45 % of its windows, sending 40 % of the requests alone.)
            rate = (requests - self._requests) / elapsed  # requests per second
            self._requests = requests
            margin = 0.0
            if self.saturated:  # (rate > 0: a caller that counts no requests gets the plain margin)
                kept = (
                    not few_callers and rate > 0 and rate >= HOLD_RATE_KEPT * self._saturated_rate
                )
                margin = HOLD_HYSTERESIS_KEPT if kept else HOLD_HYSTERESIS
            saturated = (
                self.busy >= HOLD_LOAD - margin
                or self.pressed >= HOLD_PRESSED - margin
                or self.throttled
            )
            if saturated and not self.saturated:
                self._saturated_rate = rate
            self.saturated = saturated
            self._since, self._cpu = now, cpu
        elif elapsed < 0:
            self._since = now


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
        hold_when_saturated: bool = True,
    ) -> None:
        self._name = name
        self._executor = executor
        self._max_rows = max(1, max_batch_size)
        self._batching = max_batch_size > 0
        self._delay_s = max_queue_delay_us / 1e6
        self._max_queue = max_queue_size
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handle: asyncio.Handle | None = None  # a flush is scheduled
        self._inflight: set[_Batch] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._is_idle = True  # mirrors _idle without a method call per request
        self._running = False
        self._load = LoopLoad(throttle=throttle_watch())
        self._load_count = 0
        self._may_hold = hold_when_saturated
        self._holding = False  # a lone request is held for company
        self._hold_rows = HOLD_ROWS  # rows a hold waits for (adapts, HOLD_ROWS..._MAX)
        self._hold_ceiling = HOLD_ROWS_MAX  # lowered to the rows the callers can fill
        self._last_fill = 0  # rows of the last hold that filled up
        self._fills = 0  # holds filled since the ceiling last moved
        self._gathered = 0  # timed-out holds in a row that got exactly the last fill's rows
        self._no_hold_until = 0.0
        self._missed = 0  # holds in a row that caught no second request
        self._next_sweep = 0.0  # when a full queue may next be swept of abandoned requests

    @property
    def queue_depth(self) -> int:
        """Requests queued that still wait: not those whose caller gave up or whose deadline
        (or retry time) passed, which stay in the queue until a dispatch or a sweep drops them.
        Counted when read (a scrape, a controller tick), not on the request path."""
        now = time.monotonic()
        return sum(
            1
            for i in self._queue
            if not i.future.done()
            and (i.deadline is None or i.deadline > now)
            and (i.lost is None or i.retry_until > now)
        )

    @property
    def inflight_batches(self) -> int:
        return len(self._inflight)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._executor.on_slot_free(self._kick)

    async def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop dispatching; fail what is still queued; wait up to ``wait_s`` for batches already
        running (they end with their reply, or with WorkerLostError when the pool stops their
        worker). 0 when nobody waits for them any more (the server's grace period is over)."""
        self._running = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._fail_queue(
            ModelNotReadyError(f"model {self._name!r} is shutting down")
        )  # UNAVAILABLE
        if self._idle.is_set():
            return
        if wait_s <= 0:
            log.info(
                "model %s: %d batches still running at stop; their workers are stopped with them",
                self._name,
                len(self._inflight),
            )
            return
        try:
            async with asyncio.timeout(wait_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "model %s: %d batches still running %g s after stop; leaving them to the pool",
                self._name,
                len(self._inflight),
                wait_s,
            )

    async def drain(self) -> None:
        """Return once nothing is queued or running (callers stop sending first)."""
        await self._idle.wait()

    async def submit(
        self, inputs: list[Array], rows: int, deadline: float | None, *, timed: bool = True
    ) -> list[Array]:
        """Queue one request (inputs in model order) and wait for its own rows of every output.

        A request past its deadline is never dispatched. With ``timed`` the wait itself also ends
        at the deadline (DeadlineExceededError); without, the caller's transport ends it (gRPC
        cancels the call), which saves a timer per request."""
        future = self.enqueue(inputs, rows, deadline)
        if deadline is None or not timed:
            return await future
        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + (deadline - time.monotonic()), self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def enqueue(
        self, inputs: list[Array], rows: int, deadline: float | None
    ) -> asyncio.Future[list[Array]]:
        """Queue one request; the future of its own rows of every output. Awaiting it is the
        untimed submit() without a coroutine frame of its own (the request path uses this)."""
        if not self._running:
            raise ModelNotReadyError(f"model {self._name!r} is not taking requests")
        now = time.monotonic()
        if len(self._queue) >= self._max_queue and not self._drop_abandoned(now):
            raise QueueFullError(
                f"model {self._name!r} has {len(self._queue)} requests queued (the limit); "
                "retry later or add workers"
            )
        if deadline is not None and deadline <= now:
            raise DeadlineExceededError(f"request to {self._name!r} arrived after its deadline")
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[list[Array]] = loop.create_future()
        sig: Signature = signature(inputs) if self._batching else ()
        item = _Pending(inputs, rows, sig, deadline, now, future)
        queue = self._queue
        queue.append(item)
        if self._is_idle:
            self._is_idle = False
            self._idle.clear()
        self._load_count += 1
        if not self._load_count & 31:
            few_callers = self._hold_ceiling < HOLD_ROWS_MAX  # (lowered to the callers there are)
            self._load.sample(now, self._load_count, few_callers)
        if len(queue) == 1 and self._flush_handle is None:
            self._flush()  # nothing else waits: dispatch now, without a loop hop
        elif self._holding:  # a held batch leaves once enough company came
            if sum(i.rows for i in queue) >= self._hold_rows:  # a hold's queue is short
                self._end_hold_timer()
                self._flush()
        elif self._delay_s:  # a batch held open may be full now
            self._end_hold_timer()
            self._flush()
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("model %s: %d requests wait for a worker", self._name, len(queue))
        return future

    def _drop_abandoned(self, now: float) -> bool:
        """Take out of the full queue the requests whose callers gave up or whose deadline
        passed (dropped at dispatch anyway): while every worker is busy they would hold its
        places, and callers still waiting would be refused. At most once per SWEEP_EVERY_S (a
        queue full of live requests refuses at once, not after a scan). Whether there is room."""
        if now < self._next_sweep:
            return False
        self._next_sweep = now + SWEEP_EVERY_S
        queue = self._queue
        kept = [i for i in queue if not (i.future.done() or self._expired(i, now))]
        if len(kept) < len(queue):
            queue.clear()
            queue.extend(kept)
        return len(queue) < self._max_queue

    def _end_hold_timer(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _expire(self, future: asyncio.Future[list[Array]]) -> None:
        if not future.done():
            future.set_exception(
                DeadlineExceededError(
                    f"request to {self._name!r} did not finish within its deadline"
                )
            )

    def _kick(self) -> None:
        """A slot may be free: flush at the end of this loop iteration (once)."""
        if self._queue and self._flush_handle is None and self._loop is not None and self._running:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Dispatch batches while requests wait and workers have room."""
        self._flush_handle = None
        queue = self._queue
        while queue and self._running:
            head = queue[0]
            if head.future.done() or self._expired(head, time.monotonic()):
                queue.popleft()  # a caller that gave up, or one past its deadline: never run
                continue
            if self._delay_s and self._batching and not head.alone:
                rows = sum(i.rows for i in queue if i.signature == head.signature)
                wait = head.enqueued + self._delay_s - time.monotonic()
                if rows < self._max_rows and wait > 0:
                    assert self._loop is not None
                    self._flush_handle = self._loop.call_later(wait, self._flush)
                    break
            lease = self._executor.acquire_now()
            if lease is None:
                reason = self._executor.unavailable()
                if reason:
                    self._fail_queue(ModelNotReadyError(f"model {self._name!r}: {reason}"))
                elif log.isEnabledFor(logging.DEBUG):
                    log.debug("model %s: %d requests wait for a worker", self._name, len(queue))
                break  # a freed slot kicks the next flush
            # Hold only with a worker free: without one, requests wait (and batch) anyway.
            if (self._holding or self._load.saturated) and self._should_hold(head):
                lease.release()  # its notice finds the hold's timer set: no flush now
                return
            if (
                head.alone
                or not self._batching
                or (len(queue) == 1 and head.rows <= self._max_rows)
            ):
                items = [queue.popleft()]
            else:
                items = self._take(head)
                queue = self._queue
            self._dispatch(lease, items)
        self._check_idle()

    def _should_hold(self, head: _Pending) -> bool:
        """Hold a lone request for company while the event loop is saturated (module doc)."""
        if self._holding:  # the hold ends now: company came, or the cap passed
            self._holding = False
            waiting = sum(i.rows for i in self._queue)
            if waiting >= self._hold_rows:  # filled within the cap: wait for more next time
                self._missed = 0
                self._last_fill = waiting
                self._fills += 1
                if self._fills >= HOLD_PROBE_FILLS:  # perhaps more callers came: probe
                    self._fills = 0
                    self._hold_ceiling = min(self._hold_ceiling + 1, HOLD_ROWS_MAX)
                self._hold_rows = min(self._hold_rows * 2, self._hold_ceiling, self._max_rows)
            elif waiting > 1:  # some company, not enough: wait for less
                self._missed = 0
                self._gathered = self._gathered + 1 if waiting == self._last_fill else 0
                lowered = self._hold_ceiling < HOLD_ROWS_MAX  # (then this was a probe)
                if self._gathered >= HOLD_GATHERED or (self._gathered and lowered):
                    # The same rows as the last fill, again: every caller there is. Wait for
                    # that many, not for more (that only waits out the cap).
                    self._fills = self._gathered = 0
                    self._hold_ceiling = self._hold_rows = waiting
                else:
                    self._hold_rows = max(HOLD_ROWS, self._hold_rows // 2)
            else:  # nobody came; several in a row: a single caller waits on itself
                self._hold_rows = HOLD_ROWS
                self._missed += 1
                if self._missed >= HOLD_MISSES:
                    self._missed = 0
                    self._no_hold_until = time.monotonic() + HOLD_BACKOFF_S
            return False
        if (
            not self._may_hold
            or not self._batching
            or self._delay_s
            or head.lost is not None
            or head.alone
            or sum(i.rows for i in self._queue) >= self._hold_rows
            or not self._load.saturated
            or time.monotonic() < self._no_hold_until
        ):
            return False
        assert self._loop is not None
        self._holding = True
        self._flush_handle = self._loop.call_later(HOLD_CAP_S, self._flush)
        return True

    def _dispatch(self, lease: WorkerLease, items: list[_Pending]) -> None:
        start = time.monotonic()
        batch = _Batch(self, items, start)
        rows = batch.rows
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "model %s: dispatching %d rows from %d requests", self._name, rows, len(items)
            )
        self._inflight.add(batch)
        try:
            lease.start([i.inputs for i in items], rows, batch)
        except WorkerLostError as exc:
            self._finished(batch, exc)
        except Exception as exc:  # a bug on our side: fail these callers, keep serving
            log.exception("model %s: could not send a batch", self._name)
            lease.release()
            self._finished(batch, exc)

    def _finished(self, batch: _Batch, outcome: BatchResult | BaseException) -> None:
        self._inflight.discard(batch)
        result = outcome if isinstance(outcome, BatchResult) else None
        again: list[_Pending] = []  # requests that run again: their queue time counts later
        if result is not None:
            try:
                parts = split(result.outputs, batch.row_counts)
            except ValueError as exc:
                self._fail(
                    batch.items,
                    ModelExecutionError(f"model {self._name!r} returned bad outputs: {exc}"),
                )
            else:
                for item, part in zip(batch.items, parts, strict=True):
                    if not item.future.done():
                        item.future.set_result(part)
        elif isinstance(outcome, WorkerLostError):
            again = self._retry(batch.items, outcome)
        elif isinstance(outcome, InvalidInputError | ModelExecutionError) and len(batch.items) > 1:
            again = self._isolate(batch.items, outcome)  # each runs again on its own
        else:
            assert isinstance(outcome, BaseException)
            self._fail(batch.items, outcome)
        if self._observer is not None:
            ended = [i for i in batch.items if i not in again] if again else batch.items
            queue_ns = [i.queued_ns for i in ended]
            self._observer.batch_done(batch.rows, len(batch.items), queue_ns, result)
        self._kick()
        self._check_idle()

    def _retry(self, items: list[_Pending], lost: WorkerLostError) -> list[_Pending]:
        """Requeue a batch whose worker died, at the front, once: inference is idempotent, so a
        second run is safe; a second loss is final. A retried request waits for a worker at most
        until its deadline, or RETRY_WAIT_S without one. The requests of a merged batch run
        again each on its own: if one of them killed the worker, it kills the next one alone,
        not together with the others' last chance. The requests requeued."""
        live = [i for i in items if not i.future.done()]
        again = [i for i in live if i.lost is None] if self._running else []
        self._fail([i for i in live if i not in again], lost)
        if not again:
            return again
        log.warning("model %s: %s; retrying its %d requests once", self._name, lost, len(again))
        now = time.monotonic()
        until = now + RETRY_WAIT_S
        alone = len(items) > 1
        for item in reversed(again):
            item.lost = lost
            item.retry_until = until
            item.requeued = now
            item.alone = item.alone or alone
            self._queue.appendleft(item)
        self._is_idle = False
        self._idle.clear()
        if self._loop is not None:  # expire them if no worker takes them in time
            self._loop.call_later(RETRY_WAIT_S, self._kick)
        return again

    def _abandon(self, batch: _Batch, exc: Exception) -> None:
        """Handling ``batch``'s outcome raised: fail its callers still waiting with that error
        (INTERNAL, with a trace id in the log) and go on serving the others."""
        log.error(
            "model %s: handling the outcome of a batch of %d requests failed",
            self._name,
            len(batch.items),
            exc_info=exc,
        )
        self._inflight.discard(batch)
        self._fail(batch.items, exc)
        self._kick()
        self._check_idle()

    def _isolate(self, items: list[_Pending], error: ServeError) -> list[_Pending]:
        """A merged batch failed in the worker (one request's bad data, say, that passed the
        front end's checks but not the preprocessing or the model): run each of its requests
        again in a batch of its own, at the front of the queue, so that only the request at fault
        gets the error and the others their results. The requests requeued; stopping, none
        (all of them fail with ``error``)."""
        if not self._running:
            self._fail(items, error)
            return []
        live = [i for i in items if not i.future.done()]
        log.warning(
            "model %s: a batch of %d requests failed (%s); running each on its own so that only "
            "the one at fault fails",
            self._name,
            len(items),
            error,
        )
        now = time.monotonic()
        for item in reversed(live):
            item.alone = True
            item.requeued = now
            self._queue.appendleft(item)
        if live:
            self._is_idle = False
            self._idle.clear()
        return live

    def _expired(self, item: _Pending, now: float) -> bool:
        """Fail ``item`` if its deadline has passed or, retried, it found no worker in time."""
        if item.deadline is not None and item.deadline <= now:
            item.future.set_exception(
                DeadlineExceededError(f"request to {self._name!r} expired while queued")
            )
            return True
        if item.lost is not None and item.retry_until <= now:
            item.future.set_exception(item.lost)
            return True
        return False

    def _take(self, head: _Pending) -> list[_Pending]:
        """The oldest request plus later ones of its signature that fit in one batch."""
        sig = head.signature
        taken: list[_Pending] = []
        kept: deque[_Pending] = deque()
        rows = 0
        full = False
        now = time.monotonic()
        for item in self._queue:
            if item.future.done() or self._expired(item, now):
                continue  # dropped: never computed
            if (
                not full
                and not item.alone
                and item.signature == sig
                and rows + item.rows <= self._max_rows
            ):
                taken.append(item)
                rows += item.rows
            else:
                # FIFO within a signature: once one does not fit, later ones wait too.
                full = full or item.signature == sig
                kept.append(item)
        self._queue = kept
        return taken

    def _check_idle(self) -> None:
        if not self._is_idle and not self._queue and not self._inflight:
            self._is_idle = True
            self._idle.set()

    def _fail_queue(self, exc: Exception) -> None:
        queue, self._queue = self._queue, deque()
        self._fail(list(queue), exc)
        self._check_idle()

    @staticmethod
    def _fail(items: list[_Pending], exc: BaseException) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)
