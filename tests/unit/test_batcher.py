"""The dynamic batcher against an in-process fake pool (no processes, no sleeps)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serve.batching import BatchResult, DynamicBatcher
from serve.batching import batcher as batcher_module
from serve.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelExecutionError,
    ModelNotReadyError,
    ModelOutOfMemoryError,
    QueueFullError,
    WorkerLostError,
)
from serve.telemetry.stats import ModelStats


class FakeLease:
    def __init__(self, pool: FakePool) -> None:
        self.pool = pool

    def start(self, parts, rows, done) -> None:
        inputs = [np.concatenate(column, axis=0) for column in zip(*parts, strict=True)]
        self.pool.batches.append(inputs)
        self.pool.started.set()
        asyncio.get_running_loop().create_task(self._answer(inputs, done))

    async def _answer(self, inputs, done) -> None:
        await self.pool.gate.wait()
        self.pool.slots += 1
        for listener in self.pool.listeners:
            listener()
        error = self.pool.errors.pop(0) if self.pool.errors else self.pool.error
        if error is None and (inputs[0] < 0).any():  # a negative value is bad data to the model
            error = self.pool.bad_data_error
        done(error if error is not None else BatchResult([inputs[0] * 2.0]))

    def release(self) -> None:
        self.pool.slots += 1


class FakePool:
    """Doubles its first input. ``gate`` holds batches; ``slots`` bounds concurrent batches."""

    def __init__(self, slots: int = 1) -> None:
        self.batches: list[list[np.ndarray]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.slots = slots
        self.error: Exception | None = None
        self.errors: list[Exception] = []  # one per batch, before ``error``
        self.bad_data_error: Exception = ModelExecutionError("negative input")
        self.listeners = []
        self.gone = ""

    def acquire_now(self) -> FakeLease | None:
        if self.slots <= 0:
            return None
        self.slots -= 1
        return FakeLease(self)

    def on_slot_free(self, callback) -> None:
        self.listeners.append(callback)

    def unavailable(self) -> str:
        return self.gone


def make(pool: FakePool, **kwargs) -> DynamicBatcher:
    options = {"max_batch_size": 8, "max_queue_delay_us": 0, "max_queue_size": 100}
    options.update(kwargs)
    return DynamicBatcher("m", pool, **options)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_callers_each_get_their_own_rows():
    async def main():
        pool = FakePool()
        batcher = make(pool, max_queue_delay_us=50_000)
        batcher.start()
        inputs = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(40)]
        results = await asyncio.gather(*(batcher.submit([x], x.shape[0], None) for x in inputs))
        await batcher.stop()
        return pool, inputs, results

    pool, inputs, results = run(main())
    for x, (out,) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(out, x * 2)
    assert len(pool.batches) < len(inputs), "requests should have been batched"
    assert all(b[0].shape[0] <= 8 for b in pool.batches)


def test_requests_with_different_non_batch_shapes_are_never_merged():
    async def main():
        pool = FakePool()
        pool.gate.clear()
        batcher = make(pool)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit([np.zeros((1, 1), np.float32)], 1, None))
        await pool.started.wait()
        calls = [
            batcher.submit([np.full((1, 2 + i % 2), i, dtype=np.float32)], 1, None)
            for i in range(6)
        ]
        tasks = [asyncio.ensure_future(c) for c in calls]
        while batcher.queue_depth < 6:
            await asyncio.sleep(0)
        pool.gate.set()
        results = await asyncio.gather(blocker, *tasks)
        await batcher.stop()
        return pool, results

    pool, results = run(main())
    for batch in pool.batches:
        assert len({row.shape for row in batch[0]}) == 1
    widths = sorted(b[0].shape[1] for b in pool.batches[1:])
    assert widths == [2, 3], "the six queued requests form exactly one batch per width"
    for i, (out,) in enumerate(results[1:]):
        np.testing.assert_array_equal(out, np.full((1, 2 + i % 2), 2.0 * i))


def test_full_queue_is_refused_at_once():
    async def main():
        pool = FakePool()
        pool.gate.clear()
        batcher = make(pool, max_queue_size=2, max_batch_size=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([np.zeros((1, 1))], 1, None))
        await pool.started.wait()
        queued = [
            asyncio.ensure_future(batcher.submit([np.zeros((1, 1))], 1, None)) for _ in range(2)
        ]
        while batcher.queue_depth < 2:
            await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="2 requests queued"):
            await batcher.submit([np.zeros((1, 1))], 1, None)
        pool.gate.set()
        await asyncio.gather(first, *queued)
        await batcher.stop()
        return pool

    assert len(run(main()).batches) == 3


def test_callers_that_gave_up_do_not_keep_the_queue_full():
    async def main():
        pool = FakePool()
        pool.gate.clear()  # the only worker stays busy
        batcher = make(pool, max_queue_size=2, max_batch_size=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([np.zeros((1, 1))], 1, None))
        await pool.started.wait()
        gone = [asyncio.ensure_future(batcher.submit([np.ones((1, 1))], 1, None)) for _ in "ab"]
        while batcher.queue_depth < 2:
            await asyncio.sleep(0)
        for call in gone:  # their callers go away (a disconnect, a deadline gRPC enforces)
            call.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        waiting = asyncio.ensure_future(batcher.submit([np.full((1, 1), 3.0)], 1, None))
        await asyncio.sleep(0)  # queued, not refused: nobody waits in the queue any more
        pool.gate.set()
        await asyncio.gather(first, waiting)
        await batcher.stop()
        return pool

    assert [b[0][0, 0] for b in run(main()).batches] == [0.0, 3.0]  # the others never ran


def test_queue_depth_counts_only_requests_that_still_wait():
    """A caller that gave up, or a request whose deadline passed, stays in the queue until a
    dispatch or a sweep drops it; the depth reported (the warmserve_queue_depth metric, the
    controller's scale-up signal) leaves them out at once."""

    async def main():
        pool = FakePool()
        pool.gate.clear()  # the only worker stays busy: nothing leaves the queue
        batcher = make(pool, max_batch_size=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([np.zeros((1, 1))], 1, None))
        await pool.started.wait()
        gone = asyncio.ensure_future(batcher.submit([np.ones((1, 1))], 1, None))
        late = asyncio.ensure_future(
            batcher.submit([np.ones((1, 1))], 1, time.monotonic() + 0.5, timed=False)
        )
        live = asyncio.ensure_future(batcher.submit([np.ones((1, 1))], 1, None))
        await asyncio.sleep(0)  # (all three queued)
        assert batcher.queue_depth == 3
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert batcher.queue_depth == 2  # the caller that gave up is not waiting
        async with asyncio.timeout(5):
            while batcher.queue_depth > 1:  # until the deadline of ``late`` passes
                await asyncio.sleep(0.01)
        depth = batcher.queue_depth
        pool.gate.set()
        await asyncio.gather(first, live)
        with pytest.raises(DeadlineExceededError):
            await late
        await batcher.stop()
        return depth, batcher.queue_depth

    assert run(main()) == (1, 0)


def test_a_request_whose_deadline_passes_in_the_queue_is_never_computed():
    async def main():
        pool = FakePool()
        pool.gate.clear()
        batcher = make(pool, max_batch_size=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([np.zeros((1, 1))], 1, None))
        await pool.started.wait()
        expiring = asyncio.ensure_future(
            batcher.submit([np.ones((1, 1)) * 5], 1, time.monotonic() + 0.05)
        )
        with pytest.raises(DeadlineExceededError):
            await expiring
        pool.gate.set()
        await first
        await batcher.stop()
        return pool

    pool = run(main())
    assert [b[0][0, 0] for b in pool.batches] == [0.0], "the expired request reached the pool"


def test_an_already_expired_request_is_refused():
    async def main():
        batcher = make(FakePool())
        batcher.start()
        try:
            await batcher.submit([np.zeros((1, 1))], 1, time.monotonic() - 1)
        finally:
            await batcher.stop()

    with pytest.raises(DeadlineExceededError, match="after its deadline"):
        run(main())


def test_a_failing_batch_fails_only_its_own_callers():
    async def main():
        pool = FakePool()
        batcher = make(pool, max_batch_size=1)
        batcher.start()
        pool.error = ModelExecutionError("boom")
        with pytest.raises(ModelExecutionError, match="boom"):
            await batcher.submit([np.zeros((1, 1))], 1, None)
        pool.error = None
        (out,) = await batcher.submit([np.ones((1, 1))], 1, None)
        await batcher.stop()
        return out

    assert run(main()).tolist() == [[2.0]]


def test_queue_delay_holds_a_batch_until_it_is_full():
    async def main():
        pool = FakePool()
        batcher = make(pool, max_batch_size=4, max_queue_delay_us=60_000_000)
        batcher.start()
        xs = [np.full((1, 1), i, np.float32) for i in range(4)]
        await asyncio.gather(*(batcher.submit([x], 1, None) for x in xs))
        await batcher.stop()
        return pool

    pool = run(main())
    assert [b[0].shape[0] for b in pool.batches] == [4]


def test_requests_that_queue_behind_a_busy_worker_leave_together_when_it_frees():
    async def main():
        pool = FakePool()
        pool.gate.clear()
        batcher = make(pool)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([np.zeros((1, 2), np.float32)], 1, None))
        await pool.started.wait()
        rest = [
            asyncio.ensure_future(batcher.submit([np.full((1, 2), i, np.float32)], 1, None))
            for i in (1, 2, 3)
        ]
        while batcher.queue_depth < 3:
            await asyncio.sleep(0)
        pool.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        return pool, results

    pool, results = run(main())
    assert [b[0].shape[0] for b in pool.batches] == [1, 3]
    for i, (out,) in enumerate(results):
        np.testing.assert_array_equal(out, np.full((1, 2), 2.0 * i))


def _merged_behind_a_busy_worker(pool: FakePool, values: list[float], observer=None):
    """Submit one request that takes the only slot, then ``values`` (one request each) that
    queue behind it and leave together as one batch when it finishes."""

    async def main():
        batcher = make(pool, max_batch_size=8, observer=observer)
        batcher.start()
        pool.gate.clear()
        first = asyncio.ensure_future(batcher.submit([np.ones((1, 1))], 1, None))
        await pool.started.wait()
        rest = [
            asyncio.ensure_future(batcher.submit([np.full((1, 1), v)], 1, None)) for v in values
        ]
        while batcher.queue_depth < len(values):
            await asyncio.sleep(0)
        pool.gate.set()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        await batcher.stop()
        return outcomes

    return run(main())


@pytest.mark.parametrize(
    "error",
    [
        ModelExecutionError("negative input"),
        InvalidInputError("negative input"),
        ModelOutOfMemoryError("negative input needs more memory than there is"),
    ],
)
def test_one_bad_request_in_a_merged_batch_fails_alone_and_the_others_get_their_results(error):
    pool = FakePool()
    pool.bad_data_error = error
    first, good1, bad, good2 = _merged_behind_a_busy_worker(pool, [3.0, -1.0, 5.0])
    assert first[0].tolist() == [[2.0]]
    assert good1[0].tolist() == [[6.0]] and good2[0].tolist() == [[10.0]]
    assert isinstance(bad, type(error)) and "negative input" in str(bad)
    # the merged batch, then each of its requests once on its own
    assert [b[0].ravel().tolist() for b in pool.batches] == [
        [1.0],
        [3.0, -1.0, 5.0],
        [3.0],
        [-1.0],
        [5.0],
    ]


def test_a_merged_batch_of_bad_requests_runs_each_once_more_and_fails_each():
    pool = FakePool()
    outcomes = _merged_behind_a_busy_worker(pool, [-1.0, -2.0])
    assert all(isinstance(o, ModelExecutionError) for o in outcomes[1:])
    assert len(pool.batches) == 4  # [1], [-1, -2], [-1], [-2]: no third run


def test_a_failing_batch_of_one_request_is_not_run_again():
    async def main():
        pool = FakePool()
        batcher = make(pool)
        batcher.start()
        with pytest.raises(ModelExecutionError):
            await batcher.submit([np.full((1, 1), -1.0)], 1, None)
        await batcher.stop()
        return len(pool.batches)

    assert run(main()) == 1


def test_a_batch_lost_with_its_worker_is_retried_once():
    async def main():
        pool = FakePool()
        pool.errors = [WorkerLostError("worker #1 died")]
        batcher = make(pool)
        batcher.start()
        (out,) = await batcher.submit([np.ones((1, 1), np.float32)], 1, None)
        await batcher.stop()
        return pool, out

    pool, out = run(main())
    assert len(pool.batches) == 2, "the lost batch ran again"
    assert out.tolist() == [[2.0]]


def _submit_one(pool: FakePool, observer=None) -> None:
    """One request through a fresh batcher on ``pool``; whatever it raises propagates."""

    async def main():
        batcher = make(pool, observer=observer)
        batcher.start()
        try:
            await batcher.submit([np.ones((1, 1), np.float32)], 1, None)
        finally:
            await batcher.stop()

    run(main())


def test_a_batch_lost_twice_fails_with_the_loss():
    pool = FakePool()
    pool.errors = [WorkerLostError("worker #1 died"), WorkerLostError("worker #2 died")]
    with pytest.raises(WorkerLostError, match="worker #2 died"):
        _submit_one(pool)


def test_queued_requests_fail_when_no_worker_can_ever_take_them():
    pool = FakePool(slots=0)
    pool.gone = "no warm worker and none starting"
    with pytest.raises(ModelNotReadyError, match="none starting"):
        _submit_one(pool)


def test_a_deadline_passing_while_the_batch_runs_fails_only_that_caller():
    async def main():
        pool = FakePool(slots=2)
        pool.gate.clear()
        batcher = make(pool, max_batch_size=1)
        batcher.start()
        patient = asyncio.ensure_future(batcher.submit([np.ones((1, 1))], 1, None))
        hurried = asyncio.ensure_future(
            batcher.submit([np.ones((1, 1))], 1, time.monotonic() + 0.05)
        )
        with pytest.raises(DeadlineExceededError, match="did not finish within its deadline"):
            await hurried
        pool.gate.set()
        (out,) = await patient
        await batcher.stop()
        return out, batcher.inflight_batches

    out, inflight = run(main())
    assert out.tolist() == [[2.0]] and inflight == 0


async def _one_running_one_queued():
    """A batcher with one batch held running in its only slot and one request queued behind."""
    pool = FakePool()
    pool.gate.clear()
    batcher = make(pool, max_batch_size=1)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit([np.ones((1, 1))], 1, None))
    await pool.started.wait()
    queued = asyncio.ensure_future(batcher.submit([np.ones((1, 1))], 1, None))
    while batcher.queue_depth < 1:
        await asyncio.sleep(0)
    return pool, batcher, running, queued


def test_stop_fails_queued_requests_and_waits_for_running_batches():
    async def main():
        pool, batcher, running, queued = await _one_running_one_queued()
        stopping = asyncio.ensure_future(batcher.stop())
        with pytest.raises(
            ModelNotReadyError, match="shutting down"
        ):  # UNAVAILABLE: retried elsewhere
            await queued
        assert not stopping.done(), "stop() returned while a batch still ran"
        pool.gate.set()
        await stopping
        return await running

    assert run(main())[0].tolist() == [[2.0]]


def test_stop_without_a_wait_leaves_running_batches_to_the_pool():
    # the server's grace period is over: nobody waits for a running batch, so stop() must not
    # hold the shutdown up for it (its worker is stopped next)
    async def main():
        pool, batcher, running, queued = await _one_running_one_queued()
        await batcher.stop(wait_s=0)
        assert batcher.inflight_batches == 1 and not running.done()
        with pytest.raises(ModelNotReadyError, match="shutting down"):
            await queued
        pool.gate.set()
        return await running

    assert run(main())[0].tolist() == [[2.0]]


def test_a_bug_handling_a_batch_outcome_fails_its_callers_instead_of_leaving_them_waiting(
    monkeypatch,
):
    real_split = batcher_module.split
    calls = []

    def split_with_a_bug(outputs, row_counts):
        calls.append(row_counts)
        if len(calls) == 1:
            raise RuntimeError("a bug splitting the outputs")
        return real_split(outputs, row_counts)

    monkeypatch.setattr(batcher_module, "split", split_with_a_bug)

    async def main():
        pool = FakePool()
        batcher = make(pool)
        batcher.start()
        with pytest.raises(RuntimeError, match="a bug splitting the outputs"):
            # (a timeout, not a timing: without the fix the caller waits for ever)
            await asyncio.wait_for(batcher.submit([np.ones((1, 1))], 1, None), 10)
        assert batcher.inflight_batches == 0
        (out,) = await asyncio.wait_for(batcher.submit([np.ones((1, 1))], 1, None), 10)
        await asyncio.wait_for(batcher.stop(), 10)
        return out

    assert run(main()).tolist() == [[2.0]]


def _loaded(batcher: DynamicBatcher) -> None:
    """Make the batcher see a saturated event loop (its thread busy all the time)."""
    batcher._load.saturated = True


def test_a_saturated_loop_holds_a_lone_request_until_a_second_arrives():
    async def main():
        pool = FakePool(slots=4)
        batcher = make(pool)
        batcher.start()
        _loaded(batcher)
        first = asyncio.ensure_future(batcher.submit([np.zeros((1, 1), np.float32)], 1, None))
        await asyncio.sleep(0)
        held = len(pool.batches)
        second = asyncio.ensure_future(batcher.submit([np.ones((1, 1), np.float32)], 1, None))
        results = await asyncio.gather(first, second)
        await batcher.stop()
        return pool, held, results

    pool, held, results = run(main())
    assert held == 0, "the lone request left although a worker was free"
    assert [b[0].shape[0] for b in pool.batches] == [2]
    assert [r[0].tolist() for r in results] == [[[0.0]], [[2.0]]]


def test_holds_that_fill_up_wait_for_more_company_and_ones_that_do_not_for_less():
    """Under saturation the hold's target doubles each time it fills within the cap (2, 4, 8,
    never past max_batch_size) and halves when the cap passes with only some company."""

    async def main():
        pool = FakePool(slots=4)
        batcher = make(pool, max_batch_size=8)
        batcher.start()
        targets = []
        for size in (2, 4, 8, 8, 3):
            _loaded(batcher)
            first = asyncio.ensure_future(batcher.submit([np.zeros((1, 1))], 1, None))
            await asyncio.sleep(0)  # the lone request is held
            rest = [batcher.submit([np.ones((1, 1))], 1, None) for _ in range(size - 1)]
            await asyncio.gather(first, *rest)  # the last of 3 waits out the hold's cap
            targets.append(batcher._hold_rows)
        await batcher.stop()
        return pool, targets

    pool, targets = run(main())
    assert [b[0].shape[0] for b in pool.batches] == [2, 4, 8, 8, 3]
    assert targets == [4, 8, 8, 8, 4]


def test_a_hold_that_gathers_every_caller_stops_the_target_doubling_past_them():
    """Four closed-loop callers: once holds waiting for 8 gather the same 4 rows as the last hold
    that filled, twice in a row, the target stays at 4 instead of doubling into the cap every
    other hold, probes one row higher after HOLD_PROBE_FILLS holds that fill, and comes back
    to 4 when the probe times out with the 4."""
    fills = batcher_module.HOLD_PROBE_FILLS

    async def main():
        pool = FakePool(slots=4)
        batcher = make(pool, max_batch_size=8)
        batcher.start()
        targets = []
        for size in (2, 4, 4, 4, 4, *[4] * fills, 4):
            _loaded(batcher)
            first = asyncio.ensure_future(batcher.submit([np.zeros((1, 1))], 1, None))
            await asyncio.sleep(0)  # the lone request is held
            rest = [batcher.submit([np.ones((1, 1))], 1, None) for _ in range(size - 1)]
            await asyncio.gather(first, *rest)  # a hold for more than 4 waits out the cap
            targets.append(batcher._hold_rows)
        await batcher.stop()
        return pool, targets

    pool, targets = run(main())
    assert [b[0].shape[0] for b in pool.batches] == [2, 4, 4, 4, 4, *[4] * fills, 4]
    assert targets == [4, 8, 4, 8, 4, *[4] * (fills - 1), 5, 4]


def _sent_at_once(*, loaded: bool, **options) -> bool:
    """Whether a lone request leaves for the worker from its own submit() call (not held)."""

    async def main():
        pool = FakePool(slots=4)
        batcher = make(pool, **options)
        batcher.start()
        if loaded:
            _loaded(batcher)
        task = asyncio.ensure_future(batcher.submit([np.zeros((1, 1), np.float32)], 1, None))
        await asyncio.sleep(0)
        sent = len(pool.batches)
        await task
        await batcher.stop()
        return sent == 1

    return run(main())


def test_an_idle_loop_never_holds():
    assert _sent_at_once(loaded=False)


def test_holding_can_be_switched_off():
    assert _sent_at_once(loaded=True, hold_when_saturated=False)


def test_holds_that_catch_nobody_switch_holding_off():
    async def main():
        pool = FakePool(slots=4)
        batcher = make(pool)
        batcher.start()
        _loaded(batcher)
        for _ in range(batcher_module.HOLD_MISSES):  # a single caller: each hold times out
            await batcher.submit([np.zeros((1, 1), np.float32)], 1, None)
        _loaded(batcher)
        task = asyncio.ensure_future(batcher.submit([np.zeros((1, 1), np.float32)], 1, None))
        await asyncio.sleep(0)
        sent_at_once = len(pool.batches) == batcher_module.HOLD_MISSES + 1
        await task
        await batcher.stop()
        return sent_at_once

    assert run(main()), "after the misses a lone request still waited"


def test_an_untimed_request_past_its_deadline_is_still_never_computed():
    """gRPC callers pass timed=False (the transport cancels the call at the deadline); the
    batcher must still not run a request whose deadline passed while it waited."""

    async def main():
        pool = FakePool()
        pool.gate.clear()
        batcher = make(pool, max_batch_size=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([np.zeros((1, 1))], 1, None))
        await pool.started.wait()
        late = asyncio.ensure_future(
            batcher.submit([np.ones((1, 1))], 1, time.monotonic() + 0.2, timed=False)
        )
        for _ in range(100):  # queued within a few loop turns (its deadline is far off yet)
            if batcher.queue_depth >= 1:
                break
            await asyncio.sleep(0)
        assert batcher.queue_depth == 1, "the second request never queued"
        deadline_passed = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.25, deadline_passed.set_result, None)
        await deadline_passed
        assert not late.done(), "without a timer the wait does not end by itself"
        pool.gate.set()
        await first
        with pytest.raises(DeadlineExceededError, match="expired while queued"):
            await late
        await batcher.stop()
        return pool

    pool = run(main())
    assert [b[0][0, 0] for b in pool.batches] == [0.0], "the expired request reached the pool"


def test_no_hold_while_every_worker_is_busy():
    """Without a free slot a request waits (and batches) anyway: no hold timer is armed."""

    async def main():
        pool = FakePool(slots=1)
        pool.gate.clear()
        batcher = make(pool)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([np.zeros((1, 1), np.float32)], 1, None))
        await pool.started.wait()
        _loaded(batcher)
        second = asyncio.ensure_future(batcher.submit([np.ones((1, 1), np.float32)], 1, None))
        while batcher.queue_depth < 1:
            await asyncio.sleep(0)
        held_while_busy = batcher._holding
        pool.gate.set()
        await asyncio.gather(first, second)
        await batcher.stop()
        return held_while_busy

    assert run(main()) is False


def test_a_hold_ends_as_soon_as_the_rows_it_waits_for_are_there():
    """A many-row request that joins a hold fills it at once (rows count, not requests)."""

    async def main():
        pool = FakePool(slots=4)
        batcher = make(pool, max_batch_size=8)
        batcher.start()
        _loaded(batcher)
        batcher._hold_rows = 4  # as after a hold that filled up
        first = asyncio.ensure_future(batcher.submit([np.zeros((1, 1))], 1, None))
        await asyncio.sleep(0)  # held
        held = len(pool.batches)
        big = asyncio.ensure_future(batcher.submit([np.ones((3, 1))], 3, None))
        await asyncio.sleep(0)
        sent_without_timer = len(pool.batches)
        await asyncio.gather(first, big)
        await batcher.stop()
        return held, sent_without_timer, pool

    held, sent, pool = run(main())
    assert held == 0 and sent == 1, "the hold waited for its timer though its rows were there"
    assert [b[0].shape[0] for b in pool.batches] == [4]


class QueueTimes:
    """A batch observer that records the queue times it is told, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int], bool]] = []  # requests, queue_ns, succeeded

    def batch_done(self, rows, requests, queue_ns, result) -> None:
        self.batches.append((requests, list(queue_ns), result is not None))

    @property
    def counted(self) -> int:
        return sum(len(queue_ns) for _, queue_ns, _ in self.batches)


class Observers:
    def __init__(self, *observers) -> None:
        self.observers = observers

    def batch_done(self, *args) -> None:
        for observer in self.observers:
            observer.batch_done(*args)


def test_a_request_retried_after_its_worker_died_counts_its_queue_time_once():
    pool = FakePool()
    pool.errors = [WorkerLostError("worker #1 died")]
    stats, times = ModelStats(), QueueTimes()
    _submit_one(pool, Observers(stats, times))
    assert len(pool.batches) == 2, "the lost batch ran again"
    assert [(n, len(q), ok) for n, q, ok in times.batches] == [(1, 0, False), (1, 1, True)]
    assert stats.queue.count == 1 and stats.execution_count == 1
    assert all(ns >= 0 for ns in times.batches[1][1])


def test_requests_of_a_merged_batch_run_again_alone_count_their_queue_time_once():
    pool = FakePool()
    stats, times = ModelStats(), QueueTimes()
    outcomes = _merged_behind_a_busy_worker(pool, [3.0, -1.0, 5.0], Observers(stats, times))
    assert isinstance(outcomes[2], ModelExecutionError)
    assert len(pool.batches) == 5  # [1], [3, -1, 5], [3], [-1], [5]
    # every request's queue time is told once, with the batch that ended it ...
    assert times.counted == 4
    assert [len(q) for _, q, _ in times.batches] == [1, 0, 1, 1, 1]
    # ... and ModelStatistics counts it for the requests answered, as Triton does (the one
    # that failed counts as a failure only): queue.count never exceeds the requests answered
    assert stats.queue.count == 3 and stats.execution_count == 3


def test_a_failed_batch_counts_its_requests_queue_time_nowhere_in_the_statistics():
    pool = FakePool()
    pool.error = ModelExecutionError("broken model")
    stats, times = ModelStats(), QueueTimes()
    with pytest.raises(ModelExecutionError):
        _submit_one(pool, Observers(stats, times))
    assert times.counted == 1  # (the latency windows still see its wait)
    assert stats.queue.count == 0 and stats.execution_count == 0
