"""What the runtime keeps of calls that are over: nothing that grows with every call."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from typing import Any

import pytest

from serve.bundles.repository import ModelSource
from serve.config import ModelConfig, TensorSpec
from serve.errors import ModelNotFoundError
from serve.model_service import ModelState
from serve.readiness.latency import ModelLatency
from serve.runtime import Runtime


def test_control_calls_for_models_that_are_not_loaded_leave_nothing_behind(caplog):
    caplog.set_level(logging.CRITICAL, logger="serve")  # (captured log lines hold the names)

    async def main() -> tuple[list[int], list[int]]:
        runtime = Runtime([])
        names = [f"absent-{i}" for i in range(20)]  # (say, a cleanup job unloading by name)
        for name in names:
            with pytest.raises(ModelNotFoundError):
                await runtime.unload(name)
            with pytest.raises(ModelNotFoundError):
                await runtime.rollback(name, keep_previous_s=0)
        del name
        await asyncio.sleep(0)  # (the control tasks' done callbacks)
        gc.collect()
        unused = ["".join(reversed(name)) for name in names]  # held by nothing else
        return [sys.getrefcount(s) for s in names], [sys.getrefcount(s) for s in unused]

    held, unused = asyncio.run(main())
    assert held == unused  # no lock (or anything) kept per name ever asked for


class _Version:
    """A model version that is ready at once."""

    def __init__(self, source: ModelSource) -> None:
        self.config = source.model
        self.bundle_id = source.bundle_id
        self.state = ModelState.LOADING
        self.latency = ModelLatency()

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    def readiness_reason(self) -> str:
        return ""

    async def start(self) -> None:
        self.state = ModelState.READY

    async def drain(self) -> None:
        await self.stop()

    async def stop(self, batch_wait_s: float = 0.0) -> None:
        self.state = ModelState.UNAVAILABLE


def _source(version: str) -> ModelSource:
    spec = (TensorSpec("x", "FP32", (1,)),)
    model = ModelConfig("m", "onnx", "m.onnx", spec, spec, version=version)
    return ModelSource(model, f"bundle-{version}")


def test_unloading_a_model_ends_its_rollout_watch_and_keep_warm_tasks():
    async def main() -> set[asyncio.Task[Any]]:
        runtime = Runtime([])
        runtime._service = _Version  # type: ignore[assignment,method-assign]
        before = asyncio.all_tasks()
        await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=300)
        await runtime.rollout(_source("2"), watch_s=300, keep_previous_s=300)  # a watch runs
        await runtime.unload("m")
        for _ in range(20):  # (a cancelled task ends at its next step)
            await asyncio.sleep(0)
        left = asyncio.all_tasks() - before
        await runtime.stop()
        return left

    assert asyncio.run(main()) == set()  # none of them left waiting out its 300 s for nothing
