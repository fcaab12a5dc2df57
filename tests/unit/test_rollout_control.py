"""Model control against a real Runtime (its versions stand-ins): what a caller that goes
away, or a bad request, leaves behind."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

import serve.control
from serve.bundles.build import build_bundle
from serve.bundles.cache import BundleCache
from serve.bundles.repository import ModelSource
from serve.config import ServerConfig
from serve.control import ModelControl
from serve.model_service import ModelState
from serve.readiness.latency import ModelLatency
from serve.runtime import Runtime
from serve.testing.models import build_mlp_onnx


class _Version:
    """A model version that is ready as soon as it starts."""

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


def _runtime() -> Runtime:
    runtime = Runtime([])
    runtime._service = _Version  # type: ignore[method-assign,assignment]
    return runtime


def _repository(tmp: Path, *versions: str) -> Path:
    repo = tmp / "repo"
    for version in versions:
        folder = build_mlp_onnx(tmp / f"src-{version}", name="mlp", version=version)
        build_bundle(folder, repo / "mlp" / version)
    return repo


def _control(runtime: Runtime, repo: Path, tmp: Path) -> ModelControl:
    config = ServerConfig(model_control=True, rollout_watch_s=0, keep_previous_s=0)
    return ModelControl(runtime, config, repo, BundleCache(tmp / "cache"))


def test_a_load_whose_caller_goes_away_while_the_repository_is_scanned_still_loads(
    tmp_path, monkeypatch
):
    """Hashing a repository of large bundles takes a while; a client whose deadline passes
    meanwhile must not turn the load into nothing (a load goes on to the end)."""
    repo = _repository(tmp_path, "1")
    scanning, release = threading.Event(), threading.Event()
    real_scan = serve.control.scan

    def slow_scan(*args: Any) -> Any:
        scanning.set()
        assert release.wait(10)
        return real_scan(*args)

    monkeypatch.setattr(serve.control, "scan", slow_scan)

    async def main() -> str:
        runtime = _runtime()
        control = _control(runtime, repo, tmp_path)
        try:
            caller = asyncio.ensure_future(control.load("mlp"))
            async with asyncio.timeout(10):
                while not scanning.is_set():
                    await asyncio.sleep(0.01)
            caller.cancel()  # the client's deadline passed
            with pytest.raises(asyncio.CancelledError):
                await caller
            release.set()
            async with asyncio.timeout(10):
                while not runtime.model_ready("mlp"):
                    await asyncio.sleep(0.01)
            return runtime.service("mlp").config.version
        finally:
            release.set()
            await runtime.stop()

    assert asyncio.run(main()) == "1"
