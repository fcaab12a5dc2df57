"""Model control against a real Runtime (its versions stand-ins): what a caller that goes
away, or a bad request, leaves behind."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

import serve.control
from serve.bundles.build import build_bundle
from serve.bundles.cache import BundleCache
from serve.bundles.repository import scan
from serve.config import ServerConfig
from serve.control import ModelControl
from serve.errors import InvalidBundleError
from serve.runtime import Runtime
from serve.testing.models import build_mlp_onnx
from tests.unit.test_runtime_hygiene import _Version  # a version ready as soon as it starts


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


@pytest.mark.parametrize("change", ["deleted", "changed"])
def test_a_rollback_to_a_retired_version_whose_bundle_is_gone_is_refused_naming_it(
    tmp_path, change
):
    """Version 1's keep period ended; then its bundle was deleted (or changed) on disk. A
    rollback must say so (InvalidBundleError: FAILED_PRECONDITION, not UNAVAILABLE, which
    clients retry) without starting a pool whose every worker refuses the bundle."""
    repo = _repository(tmp_path, "1", "2")

    async def main() -> None:
        runtime = _runtime()
        control = _control(runtime, repo, tmp_path)
        try:
            await control.load("mlp", "1")
            await control.load("mlp", "2")
            async with asyncio.timeout(10):
                while len(runtime.versions("mlp")) > 1:
                    await asyncio.sleep(0.01)
            if change == "deleted":
                shutil.rmtree(repo / "mlp" / "1")
            else:
                (repo / "mlp" / "1" / "model.onnx").write_bytes(b"rebuilt in place")
            started: list[str] = []
            runtime._service = lambda s: started.append(s.model.version) or _Version(s)  # type: ignore[method-assign]
            with pytest.raises(InvalidBundleError) as refused:
                await control.rollback("mlp")
            expected = "no manifest.json" if change == "deleted" else "model.onnx does not match"
            assert expected in str(refused.value)
            assert started == []
            assert runtime.service("mlp").config.version == "2"
        finally:
            await runtime.stop()

    asyncio.run(main())


def test_a_first_load_of_a_bundle_changed_since_the_scan_leaves_no_model_behind(tmp_path):
    """The bundle changed between the repository scan and the rollout: refused, and the model
    is not left listed with no version."""
    repo = _repository(tmp_path, "1")
    cache = BundleCache(tmp_path / "cache")

    async def main() -> None:
        runtime = _runtime()
        try:
            (source,) = scan(repo, cache)[0]
            (repo / "mlp" / "1" / "model.onnx").write_bytes(b"changed after the scan")
            with pytest.raises(InvalidBundleError, match=r"model\.onnx does not match"):
                await runtime.rollout(source, watch_s=0, keep_previous_s=0)
            assert runtime.model_names() == []
        finally:
            await runtime.stop()
            cache.close()

    asyncio.run(main())
