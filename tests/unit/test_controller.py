"""The controller's decisions, against a fake pool and hand-fed latency windows."""

from __future__ import annotations

import asyncio
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
    return WarmPoolController(model, pool, ModelLatency(), lambda: depth, lambda: None)  # type: ignore[arg-type]


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
