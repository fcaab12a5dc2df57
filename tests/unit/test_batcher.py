"""The dynamic batcher against an in-process fake pool (no processes, no sleeps)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serve.batching import BatchResult, DynamicBatcher
from serve.errors import DeadlineExceededError, ModelExecutionError, QueueFullError


class FakeLease:
    def __init__(self, pool: FakePool) -> None:
        self.pool = pool

    async def run(self, inputs, rows):
        self.pool.batches.append([a.copy() for a in inputs])
        self.pool.started.set()
        try:
            await self.pool.gate.wait()
            if self.pool.error is not None:
                raise self.pool.error
            return BatchResult([inputs[0] * 2.0])
        finally:
            self.pool.slots += 1

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

    def acquire_now(self) -> FakeLease | None:
        if self.slots <= 0:
            return None
        self.slots -= 1
        return FakeLease(self)

    async def acquire(self) -> FakeLease:
        while self.slots <= 0:
            await asyncio.sleep(0)
        self.slots -= 1
        return FakeLease(self)


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
