"""Versions of a model: which one serves after rollouts, rollbacks and watch windows end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import serve.runtime
from serve.bundles.repository import ModelSource
from serve.config import ModelConfig, TensorSpec
from serve.model_service import ModelState
from serve.readiness.latency import ModelLatency
from serve.runtime import Runtime

SPEC = (TensorSpec("x", "FP32", (1,)),)


class _Version:
    """A model version that is ready at once, until the test says it falters."""

    def __init__(self, source: ModelSource, on_start: Callable[[], None] | None = None) -> None:
        self.config = source.model
        self.state = ModelState.LOADING
        self.latency = ModelLatency()
        self.failing = False
        self.stopped = False
        self.on_start = on_start

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY and not self.failing

    def readiness_reason(self) -> str:
        return "probes fail" if self.failing else ""

    async def start(self) -> None:
        self.state = ModelState.READY
        if self.on_start is not None:
            self.on_start()

    async def drain(self) -> None:
        await self.stop()

    async def stop(self, batch_wait_s: float = 0.0) -> None:
        self.state, self.stopped = ModelState.UNAVAILABLE, True


def _runtime(monkeypatch: pytest.MonkeyPatch, **hooks: Callable[[], None]) -> tuple[Runtime, dict]:
    monkeypatch.setattr(serve.runtime, "WATCH_TICK_S", 0)
    runtime, made = Runtime([]), {}

    def service(source: ModelSource) -> Any:
        made[source.model.version] = _Version(source, hooks.get("v" + source.model.version))
        return made[source.model.version]

    runtime._service = service  # type: ignore[method-assign]
    return runtime, made


def _source(version: str) -> ModelSource:
    model = ModelConfig("m", "onnx", "m.onnx", SPEC, SPEC, version=version)
    return ModelSource(model, f"bundle-{version}")


def _active(runtime: Runtime) -> str:
    return runtime.service("m").config.version


def _loaded(runtime: Runtime) -> list[str]:
    return sorted(s.config.version for s in runtime.versions("m"))


async def _finished(tasks: set[asyncio.Task[None]]) -> None:
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)


def test_a_watch_of_a_version_already_replaced_does_not_switch_back_to_an_older_one(monkeypatch):
    """Version 2 is watched; version 3 replaces it; version 2 then falters. Its watch ends: it
    must not "roll back" to version 1 over version 3, which the operator just rolled out."""

    async def main() -> str:
        runtime, made = _runtime(monkeypatch, v3=lambda: setattr(made["2"], "failing", True))
        await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=0)
        await runtime.rollout(_source("2"), watch_s=1000, keep_previous_s=0)
        watch_of_2 = set(runtime._entries["m"].tasks)
        await runtime.rollout(_source("3"), watch_s=0, keep_previous_s=0)
        await _finished(watch_of_2)
        active = _active(runtime)
        await runtime.stop()
        return active

    assert asyncio.run(main()) == "3"
