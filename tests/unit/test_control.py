"""Model control's choice of what to roll out from the repository."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from serve.bundles.archive import write_archive
from serve.bundles.build import build_bundle
from serve.bundles.cache import BundleCache
from serve.bundles.repository import ModelSource, scan
from serve.bundles.verify import verify_bundle
from serve.config import ServerConfig
from serve.control import ModelControl
from serve.errors import InvalidBundleError, InvalidInputError
from serve.testing.models import build_mlp_onnx


class _Runtime:
    """Records what model control rolls out."""

    def __init__(self) -> None:
        self.rolled_out: list[str] = []
        self.loaded: set[str] = set()  # bundle ids

    async def rollout(self, source: ModelSource, *, watch_s: float, keep_previous_s: float) -> None:
        self.rolled_out.append(source.model.version)

    def bundles_in_use(self) -> set[str]:
        return set(self.loaded)

    async def run_to_end(self, name: str, what: str, work: Any) -> Any:
        return await work


def _bundle(tmp: Path, repo: Path, version: str) -> Path:
    folder = build_mlp_onnx(tmp / f"src-{version}", name="mlp", version=version)
    return build_bundle(folder, repo / "mlp" / version).path


def _with_a_broken_version_2(tmp_path: Path) -> tuple[_Runtime, ModelControl]:
    """A repository with bundles 1 and 2 of "mlp", 2 copied in half-written, under control."""
    runtime, control = _control_of_versions(tmp_path, "1", "2")
    (tmp_path / "repo" / "mlp" / "2" / "model.onnx").write_bytes(b"half-written")
    return runtime, control


def test_a_load_without_a_version_is_refused_when_a_bundle_of_the_model_is_broken(tmp_path):
    """Version 2 was copied in half-written (or tampered with): "load the newest" must not
    quietly roll out (or keep) version 1 and report success as if version 2 now served."""
    runtime, control = _with_a_broken_version_2(tmp_path)
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
        BundleCache(tmp_path / "cache"),
    )
    with pytest.raises(InvalidBundleError, match=r"mlp/2: file model\.onnx does not match"):
        asyncio.run(control.load("mlp"))
    assert runtime.rolled_out == []


def test_a_load_frees_the_cache_entries_of_archives_gone_from_the_repository(tmp_path):
    """A long-lived pod rolls out .wsb after .wsb into a 2 GiB emptyDir: the unpacked copies
    of versions neither in the repository nor loaded any more must not pile up."""
    repo, root = tmp_path / "repo", tmp_path / "cache"
    repo.mkdir()
    archives = {}
    for version in ("1", "2", "3"):
        archives[version] = repo / f"mlp-{version}.wsb"
        write_archive(_bundle(tmp_path, tmp_path / "built", version), archives[version])
    runtime = _Runtime()
    control = ModelControl(
        runtime,  # type: ignore[arg-type]
        ServerConfig(model_control=True),
        repo,
        BundleCache(root),
    )
    assert asyncio.run(control.load("mlp")) == "3"
    ids = {s.model.version: s.bundle_id for s in control_sources(repo, root)}
    runtime.loaded = {ids["2"]}  # version 2 still loaded (kept warm, say)
    archives["1"].unlink()
    archives["2"].unlink()
    assert asyncio.run(control.load("mlp")) == "3"
    kept = {p.name for p in root.iterdir() if not p.name.endswith(".lock")}
    assert kept == {ids["2"], ids["3"]}
    runtime.loaded = set()  # version 2 retired
    asyncio.run(control.load("mlp"))
    assert sorted(p.name for p in root.iterdir()) == [ids["3"], f"{ids['3']}.lock"]


def control_sources(repo: Path, root: Path) -> list[ModelSource]:
    """The sources a scan finds, through a cache object of its own (closed: holds nothing)."""
    cache = BundleCache(root)
    try:
        return scan(repo, cache)[0]
    finally:
        cache.close()


@pytest.mark.parametrize("name", ["", "mlp/2"])
def test_a_control_request_for_no_model_name_or_a_path_is_invalid_not_another_models_problem(
    tmp_path, name
):
    """An empty model_name (or a path) is a bad request (INVALID_ARGUMENT): it must not be
    answered with the refusal of some other bundle in the repository (FAILED_PRECONDITION)."""
    runtime, control = _with_a_broken_version_2(tmp_path)
    for call in (control.load(name), control.rollback(name), control.unload(name)):
        with pytest.raises(InvalidInputError, match="model name must be non-empty"):
            asyncio.run(call)
    assert runtime.rolled_out == []


def test_a_cache_collection_during_a_load_keeps_the_copy_that_load_rolls_out(tmp_path):
    """A load picks a bundle from its scan and rolls it out; meanwhile its archive leaves the
    repository (replaced, synced away) and another load's scan collects the cache: the copy
    the first load's workers are about to verify and load must still be there."""
    repo, root = tmp_path / "repo", tmp_path / "cache"
    repo.mkdir()
    write_archive(_bundle(tmp_path, tmp_path / "built", "1"), repo / "mlp-1.wsb")
    other = build_mlp_onnx(tmp_path / "src-other", name="other", version="1")
    write_archive(build_bundle(other, tmp_path / "built" / "other").path, repo / "other-1.wsb")
    rolling, go_on = asyncio.Event(), asyncio.Event()
    verified: list[str] = []

    class Slow(_Runtime):
        async def rollout(self, source: ModelSource, **kwargs: Any) -> None:
            if source.model.name == "mlp":
                rolling.set()
                await go_on.wait()  # (its service starts; its workers verify the bundle)
                verified.append(verify_bundle(Path(source.model.directory), source.bundle_id).id)
            await super().rollout(source, **kwargs)

    async def main() -> None:
        control = ModelControl(
            Slow(),  # type: ignore[arg-type]
            ServerConfig(model_control=True),
            repo,
            BundleCache(root),
        )
        first = asyncio.create_task(control.load("mlp"))
        await asyncio.wait_for(rolling.wait(), 30)
        (repo / "mlp-1.wsb").unlink()
        assert await control.load("other") == "1"
        go_on.set()
        assert await first == "1"

    asyncio.run(main())
    assert len(verified) == 1


def _control_of_versions(tmp_path: Path, *versions: str) -> tuple[_Runtime, ModelControl]:
    repo = tmp_path / "repo"
    for version in versions:
        _bundle(tmp_path, repo, version)
    runtime = _Runtime()
    control = ModelControl(
        runtime,  # type: ignore[arg-type]
        ServerConfig(model_control=True),
        repo,
        BundleCache(tmp_path / "cache"),
    )
    return runtime, control


def test_a_version_sent_as_an_int64_parameter_loads_that_version(tmp_path):
    runtime, control = _control_of_versions(tmp_path, "1", "2", "3")
    assert asyncio.run(control.load("mlp", 2)) == "2"
    assert runtime.rolled_out == ["2"]


@pytest.mark.parametrize("version", [True, False, b"2", -1, 2.0])
def test_a_version_parameter_of_another_type_is_invalid_naming_it(tmp_path, version):
    """Turned into text, True asked for a version "True" (and False for "False": NOT_FOUND,
    or worse, the newest): a bad request says which parameter and what it takes."""
    runtime, control = _control_of_versions(tmp_path, "1")
    expected = r"parameter 'version' must be a version label: a string, or an int64"
    for call in (control.load("mlp", version), control.unload("mlp", version)):
        with pytest.raises(InvalidInputError, match=expected):
            asyncio.run(call)
    assert runtime.rolled_out == []
