"""Model control's choice of what to roll out from the repository."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serve.bundles.build import build_bundle
from serve.bundles.repository import ModelSource
from serve.config import ServerConfig
from serve.control import ModelControl
from serve.errors import InvalidBundleError
from serve.testing.models import build_mlp_onnx


class _Runtime:
    """Records what model control rolls out."""

    def __init__(self) -> None:
        self.rolled_out: list[str] = []

    async def rollout(self, source: ModelSource, *, watch_s: float, keep_previous_s: float) -> None:
        self.rolled_out.append(source.model.version)


def _bundle(tmp: Path, repo: Path, version: str) -> Path:
    folder = build_mlp_onnx(tmp / f"src-{version}", name="mlp", version=version)
    return build_bundle(folder, repo / "mlp" / version).path


def test_a_load_without_a_version_is_refused_when_a_bundle_of_the_model_is_broken(tmp_path):
    """Version 2 was copied in half-written (or tampered with): "load the newest" must not
    quietly roll out (or keep) version 1 and report success as if version 2 now served."""
    repo = tmp_path / "repo"
    _bundle(tmp_path, repo, "1")
    (_bundle(tmp_path, repo, "2") / "model.onnx").write_bytes(b"half-written")
    runtime = _Runtime()
    control = ModelControl(
        runtime,  # type: ignore[arg-type]
        ServerConfig(model_control=True),
        repo,
        tmp_path / "cache",
    )
    with pytest.raises(InvalidBundleError, match=r"mlp/2: file model\.onnx does not match"):
        asyncio.run(control.load("mlp"))
    assert runtime.rolled_out == []
    assert asyncio.run(control.load("mlp", "1")) == "1"  # a version asked for by name still loads
    assert runtime.rolled_out == ["1"]


def test_a_broken_bundle_is_found_through_a_symlinked_repository_path(tmp_path):
    """Mounted volumes are often reached through a symbolic link; the refusal names the
    resolved path, and must still be recognised as this model's."""
    repo = tmp_path / "repo"
    _bundle(tmp_path, repo, "1")
    (_bundle(tmp_path, repo, "2") / "model.onnx").write_bytes(b"half-written")
    (tmp_path / "link").symlink_to(repo)
    runtime = _Runtime()
    control = ModelControl(
        runtime,  # type: ignore[arg-type]
        ServerConfig(model_control=True),
        tmp_path / "link",
        tmp_path / "cache",
    )
    with pytest.raises(InvalidBundleError, match=r"mlp/2: file model\.onnx does not match"):
        asyncio.run(control.load("mlp"))
    assert runtime.rolled_out == []
