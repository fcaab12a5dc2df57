"""The controller's decisions, against a fake pool and hand-fed latency windows."""

from __future__ import annotations

import asyncio
import logging
import types
from dataclasses import dataclass, field

from serve.config import ModelConfig, PoolConfig, TensorSpec
from serve.readiness import controller as controller_module
from serve.readiness.controller import WarmPoolController
from serve.readiness.latency import ModelLatency


@dataclass(eq=False)
class FakeWorker:
    worker_id: str
    retiring: bool = False
    probed_ok: bool = True
    probe_failures: int = 0
    last_success: float = 0.0
    failed_in_a_row: int = 0
    last_batch_error: str = ""
    busy: bool = False


@dataclass
class FakePool:
    workers: list[FakeWorker]
    target: int = 1
    replaced: list[tuple[str, bool]] = field(default_factory=list)
    scaled: list[int] = field(default_factory=list)

    def warm_workers(self) -> list[FakeWorker]:
        return list(self.workers)

    def replace(self, worker: FakeWorker, reason: str, *, stop_routing: bool) -> None:
        worker.retiring = True
        self.replaced.append((worker.worker_id, stop_routing))

    def scale_to(self, target: int, reason: str) -> None:
        self.target = target
        self.scaled.append(target)

    def acquire_now(self, worker: FakeWorker | None = None) -> None:
        return None

    def check_watchdog(self) -> None:
        return None


def _model(**pool: object) -> ModelConfig:
    return ModelConfig(
        name="m",
        backend="onnx",
        model_file="m.onnx",
        inputs=(TensorSpec("X", "FP32", (4,)),),
        outputs=(TensorSpec("Y", "FP32", (1,)),),
        max_batch_size=8,
        latency_budget_ms=5.0,
        pool=PoolConfig(**pool),  # type: ignore[arg-type]
    )


def _controller(model: ModelConfig, pool: FakePool, depth: int = 0) -> WarmPoolController:
    return WarmPoolController(
        model,
        pool,  # type: ignore[arg-type]
        ModelLatency(),
        lambda: depth,
        lambda: None,
        FakeThrottle(limited=False),  # type: ignore[arg-type]
    )


def test_a_worker_persistently_over_budget_is_replaced_while_it_keeps_serving():
    slow, fast = FakeWorker("m#1"), FakeWorker("m#2")
    pool = FakePool([slow, fast])
    control = _controller(_model(), pool)
    for _ in range(controller_module.MIN_SAMPLES):
        control.latency.worker("m#1").add(0.020)
        control.latency.worker("m#2").add(0.001)
    for _ in range(controller_module.SLOW_TICKS - 1):
        control._check_slow_workers()
    assert pool.replaced == []
    control._check_slow_workers()
    assert pool.replaced == [("m#1", False)]  # keeps routing until its replacement is warm


def test_p95_over_target_scales_up_after_the_hold_time_and_back_down_when_quiet():
    pool = FakePool([FakeWorker("m#1")])
    model = _model(
        min_warm=1, max_workers=3, p95_target_ms=2.0, scale_up_after_s=5.0, scale_down_after_s=20.0
    )
    control = _controller(model, pool)

    def slow_traffic_then_tick(now: float) -> None:
        for i in range(20):
            control.latency.end_to_end.add(0.010, now=now - i * 0.01)
        control._scale(now)

    slow_traffic_then_tick(100.5)
    slow_traffic_then_tick(104.0)
    assert pool.scaled == []
    slow_traffic_then_tick(105.6)
    assert pool.scaled == [2]
    quiet = _controller(model, pool)  # no samples, empty queue: quiet
    quiet._scale(200.0)
    quiet._scale(219.0)
    assert pool.scaled == [2]
    quiet._scale(220.5)
    assert pool.scaled == [2, 1]


def test_no_worker_is_added_while_the_cpu_limit_stops_the_server(caplog):
    """Over target while the CPU quota binds: another worker would share the same quota, so the
    pool holds (one warning per stretch, saying what to do), and the hold time starts again once
    the limit lets go."""
    pool = FakePool([FakeWorker("m#1")])
    model = _model(max_workers=3, p95_target_ms=2.0, scale_up_after_s=5.0)
    throttle = FakeThrottle()
    control = WarmPoolController(
        model,
        pool,  # type: ignore[arg-type]
        ModelLatency(),
        lambda: 0,
        lambda: None,
        throttle,  # type: ignore[arg-type]
    )

    def slow_traffic_then_tick(now: float) -> None:
        for i in range(20):
            control.latency.end_to_end.add(0.010, now=now - i * 0.01)
        control._scale(now)

    throttle.stop()
    with caplog.at_level(logging.WARNING, logger=controller_module.__name__):
        for now in (100.0, 103.0, 106.0, 109.0):
            slow_traffic_then_tick(now)
    assert pool.scaled == []
    held = [r for r in caplog.records if "CPU limit" in r.getMessage()]
    assert len(held) == 1 and "raise the CPU limit or add replicas" in held[0].getMessage()
    throttle.recent = False  # the limit lets go: a full hold time from here
    slow_traffic_then_tick(110.0)
    slow_traffic_then_tick(114.0)
    assert pool.scaled == []
    slow_traffic_then_tick(115.5)
    assert pool.scaled == [2]


def test_a_deep_queue_alone_scales_up():
    pool = FakePool([FakeWorker("m#1")])
    model = _model(max_workers=2, p95_target_ms=50.0, scale_up_after_s=1.0)
    control = _controller(model, pool, depth=100)
    control._scale(10.0)
    control._scale(11.5)
    assert pool.scaled == [2]


def test_a_busy_worker_with_recent_live_successes_counts_as_probed():
    worker = FakeWorker("m#1", probed_ok=False, last_success=1e12)
    pool = FakePool([worker])
    control = _controller(_model(), pool)
    asyncio.run(control.probe_all())
    assert worker.probed_ok


# A busy worker whose live batches fail: a real WorkerHandle in a real WorkerPool, its process
# replaced by an in-process twin that answers each batch on the next turn of the event loop, and
# a stand-in batcher that keeps every slot busy (it sends a new batch whenever one frees).

LIVE_ROWS = 2  # the probe sends one row: that is how the twin tells them apart


class WorkerTwin:
    """The worker's side of the channel: live batches fail with ``live_error`` (kind, message),
    probes succeed unless ``broken``."""

    def __init__(self, handle: object, live_error: tuple[str, str], broken: bool) -> None:
        self.handle = handle
        self.live_error = live_error
        self.broken = broken
        self.probes = 0

    def send(self, message: object) -> None:
        from serve.pool.messages import RunBatch

        assert isinstance(message, RunBatch)
        asyncio.get_running_loop().call_soon(self._answer, message)

    def _answer(self, batch: object) -> None:
        import numpy as np

        from serve.pool.messages import BatchDone, BatchFailed
        from serve.protocol.datatypes import Datatype

        handle = self.handle
        if batch.rows == LIVE_ROWS:  # type: ignore[attr-defined]
            kind, message = self.live_error
            handle._on_message(BatchFailed(batch.batch_id, kind, message))  # type: ignore[attr-defined]
            return
        self.probes += 1
        if self.broken:
            failed = BatchFailed(batch.batch_id, "execution", "CUDA error: launch failure")  # type: ignore[attr-defined]
            handle._on_message(failed)  # type: ignore[attr-defined]
            return
        y = np.zeros((batch.rows, 1), np.float32)  # type: ignore[attr-defined]
        refs = handle._outputs.write(batch.slot, [("Y", Datatype.FP32, [y])])  # type: ignore[attr-defined]
        handle._on_message(BatchDone(batch.batch_id, refs, 0, 0, 0))  # type: ignore[attr-defined]

    def close(self) -> None:
        pass


def _arena() -> object:
    import os

    from serve.pool.arena import Arena, create_memfd

    fd = create_memfd("test", 2 << 20)
    try:
        return Arena(fd, 2, 1 << 20)
    finally:
        os.close(fd)


def _saturated_worker(
    live_error: tuple[str, str], *, broken: bool, ticks: int
) -> dict[str, object]:
    """Run ``ticks`` controller ticks against one busy worker; what became of it."""
    import msgspec
    import numpy as np

    from serve.pool.pool import WorkerPool
    from serve.pool.worker_handle import WorkerState

    model = msgspec.structs.replace(_model(), latency_budget_ms=0.0)  # no timing in the verdict

    async def main() -> dict[str, object]:
        pool = WorkerPool(model)
        pool.target = 0  # a replacement would spawn a process: the test only looks at the decision
        handle = pool._new_handle()
        twin = WorkerTwin(handle, live_error, broken)
        handle._link, handle._inputs, handle._outputs = twin, _arena(), _arena()  # type: ignore[assignment]
        handle.state = WorkerState.WARM
        handle.probed_ok = True  # passed its probes until its batches began to fail
        live_outcomes: list[object] = []
        enough = asyncio.get_running_loop().create_future()  # a streak of live answers came
        traffic = True

        def answered(outcome: object) -> None:
            live_outcomes.append(outcome)
            if len(live_outcomes) >= model.probe.failures_to_replace and not enough.done():
                enough.set_result(None)

        def dispatch() -> None:  # the batcher with a deep queue: every free slot is used at once
            while traffic and (lease := pool.acquire_now()) is not None:
                lease.start([[np.zeros((LIVE_ROWS, 4), np.float32)]], LIVE_ROWS, answered)

        pool.on_slot_free(dispatch)
        dispatch()
        async with asyncio.timeout(10):  # only bounds a broken test
            await enough
        control = WarmPoolController(model, pool, ModelLatency(), lambda: 0, lambda: None)
        control._last_probe = float("inf")  # no periodic probe: only what the failures trigger
        try:
            for _ in range(ticks):
                assert handle.free_slots == 0  # busy: live traffic never leaves a slot free
                await control.tick()
        finally:
            traffic = False
        return {
            "retiring": handle.retiring,
            "draining": handle.draining,
            "probed_ok": handle.probed_ok,
            "probes": twin.probes,
            "live": live_outcomes,
            "last_failure": control.last_failure,
        }

    return asyncio.run(main())


def test_a_busy_worker_whose_live_batches_all_fail_is_probed_at_once_and_replaced():
    failures = _model().probe.failures_to_replace
    seen = _saturated_worker(
        ("execution", "CUDA error: launch failure"), broken=True, ticks=failures
    )
    assert seen["live"], "the worker was busy"
    assert seen["probes"] == failures  # probed on each tick although every slot was busy
    assert not seen["probed_ok"]  # out of the healthy workers: readiness counts it no more
    assert seen["retiring"] and seen["draining"]  # replaced, no new batches meanwhile
    assert "CUDA error" in str(seen["last_failure"])


def test_live_batches_that_fail_on_bad_client_data_never_get_a_healthy_worker_replaced():
    # The model raised on the data (a non-image sent to an image model, a negative count...):
    # an "execution" failure that says nothing about the worker. Its probe passes.
    seen = _saturated_worker(
        ("execution", "RuntimeError: ITERS must be non-negative"), broken=False, ticks=5
    )
    assert len(seen["live"]) > 5  # type: ignore[arg-type]
    assert seen["probes"] >= 1  # the failures had it probed ...
    assert seen["probed_ok"] and not seen["retiring"]  # ... and the probe cleared it


def test_invalid_input_does_not_even_get_the_worker_probed():
    seen = _saturated_worker(
        ("invalid_input", "cannot read inputs: bad shape"), broken=True, ticks=3
    )
    assert len(seen["live"]) > 3  # type: ignore[arg-type]
    assert seen["probes"] == 0 and seen["probed_ok"] and not seen["retiring"]


class HoldingTwin(WorkerTwin):
    """A worker still computing its live batches (they are never answered); probes pass."""

    def _answer(self, batch: object) -> None:
        if batch.rows != LIVE_ROWS:  # type: ignore[attr-defined]
            super()._answer(batch)


def test_a_worker_computing_a_live_batch_is_not_probed_behind_it():
    # A probe sent to a worker with one of its two slots busy waits in the worker behind that
    # batch, and its timeout and latency budget would count the wait: under load a healthy
    # worker failed its probes and was replaced. Busy with live batches that succeed, it is not
    # probed that round (its recent successes stand in).
    import time

    import numpy as np

    from serve.pool.pool import WorkerPool
    from serve.pool.worker_handle import WorkerState
    from serve.readiness.probe import Prober

    model = _model()

    async def main() -> tuple[object, int, int]:
        pool = WorkerPool(model)
        pool.target = 0
        handle = pool._new_handle()
        twin = HoldingTwin(handle, ("execution", "unused"), broken=False)
        handle._link, handle._inputs, handle._outputs = twin, _arena(), _arena()  # type: ignore[assignment]
        handle.state = WorkerState.WARM
        handle.last_success = time.monotonic()
        lease = pool.acquire_now()
        assert lease is not None
        lease.start([[np.zeros((LIVE_ROWS, 4), np.float32)]], LIVE_ROWS, lambda outcome: None)
        free = handle.free_slots
        result = await Prober(model, pool).probe(handle)
        return result, twin.probes, free

    result, probes, free = asyncio.run(main())
    assert free == 1  # a slot was free: the probe could have been sent
    assert result is None and probes == 0


# The CPU limit (serve/cpus.py): while it stops the process, latency is not a worker's fault.


class FakeThrottle:
    """A ThrottleWatch whose count rises by one at each ``stop()``."""

    def __init__(self, limited: bool = True) -> None:
        self.count = 0 if limited else None
        self.recent = False

    def stop(self) -> None:
        assert self.count is not None
        self.count += 1
        self.recent = True

    def periods(self) -> int | None:
        return self.count

    def throttled_within(self, seconds: float) -> bool:
        return self.recent


class SlowLease:
    """A probe's lease whose batch takes ``seconds`` on the probe module's clock, during which
    the CPU limit stops the process if ``throttle`` is given; its answer is ``outputs``."""

    def __init__(self, clock: list[float], seconds: float, throttle: FakeThrottle | None, outputs):
        self.clock, self.seconds, self.throttle, self.outputs = clock, seconds, throttle, outputs

    async def run(self, inputs: object, rows: int) -> object:
        self.clock[0] += self.seconds
        if self.throttle is not None:
            self.throttle.stop()
        return types.SimpleNamespace(outputs=self.outputs)


def _probe(monkeypatch, *, seconds: float, stopped: bool, outputs=None) -> tuple[object, str]:
    """Probe one idle worker whose answer takes ``seconds`` (the model's budget is 5 ms),
    with the CPU limit stopping the process meanwhile or not."""
    import numpy as np

    from serve.readiness import probe as probe_module
    from serve.readiness.probe import Prober

    clock = [100.0]
    monkeypatch.setattr(probe_module.time, "monotonic", lambda: clock[0])
    throttle = FakeThrottle()
    answer = [np.zeros((1, 1), np.float32)] if outputs is None else outputs
    lease = SlowLease(clock, seconds, throttle if stopped else None, answer)
    pool = types.SimpleNamespace(acquire_now=lambda worker: lease)
    prober = Prober(_model(), pool, throttle)  # type: ignore[arg-type]
    result = asyncio.run(prober.probe(FakeWorker("m#1")))  # type: ignore[arg-type]
    assert result is not None
    return result, result.reason


def test_a_probe_over_its_budget_fails_the_worker(monkeypatch):
    result, reason = _probe(monkeypatch, seconds=0.060, stopped=False)
    assert not result.ok and "probe took 60.0 ms, over the 5 ms budget" in reason


def test_a_probe_over_its_budget_while_the_cpu_limit_stopped_the_server_passes(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="serve.readiness.probe"):
        result, _ = _probe(monkeypatch, seconds=0.060, stopped=True)
    assert result.ok
    assert "the CPU limit stopped this server meanwhile: not held against the worker" in caplog.text


def test_a_wrong_answer_fails_even_while_the_cpu_limit_stops_the_server(monkeypatch):
    import numpy as np

    nan = [np.full((1, 1), np.nan, np.float32)]
    result, reason = _probe(monkeypatch, seconds=0.001, stopped=True, outputs=nan)
    assert not result.ok and "non-finite" in reason


def test_a_slow_worker_is_not_replaced_while_the_cpu_limit_stops_the_server(caplog):
    slow = FakeWorker("m#1")
    pool = FakePool([slow])
    throttle = FakeThrottle()
    throttle.stop()
    control = WarmPoolController(
        _model(),
        pool,
        ModelLatency(),
        lambda: 0,
        lambda: None,
        throttle,  # type: ignore[arg-type]
    )
    for _ in range(controller_module.MIN_SAMPLES):
        control.latency.worker("m#1").add(0.020)
    with caplog.at_level(logging.INFO, logger="serve.readiness.controller"):
        for _ in range(2 * controller_module.SLOW_TICKS):
            control._check_slow_workers()
    assert pool.replaced == []
    assert caplog.text.count("while the CPU limit stops this server: not counted slow") == 1
    throttle.recent = False  # the limit no longer stops it: the budget holds again
    for _ in range(controller_module.SLOW_TICKS):
        control._check_slow_workers()
    assert pool.replaced == [("m#1", False)]
