"""Building a bundle from a model folder (model.toml + the files it names), reproducibly: the same
inputs give the same bytes and so the same id (no timestamps, no absolute paths)."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import msgspec

from serve import __version__
from serve.bundles.manifest import FORMAT, MANIFEST_FILE, FileEntry, Manifest, encode
from serve.bundles.verify import VerifiedBundle, sha256_file, verify_bundle
from serve.config import ModelConfig, load_model_dir, model_files
from serve.errors import InvalidBundleError

FRAMEWORKS = {"onnx": ("onnxruntime", "onnx"), "torch": ("torch",)}
# the distributions that provide a framework (the GPU build of onnxruntime is another package)
DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


def framework_versions(backend: str) -> dict[str, str]:
    """Installed versions of what the backend runs on (read from metadata, nothing imported)."""
    versions = {"warmserve": __version__}
    for package in FRAMEWORKS.get(backend, ()):
        for distribution in DISTRIBUTIONS.get(package, (package,)):
            try:
                versions[package] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _relative(name: str, source: Path) -> str:
    path = Path(name)
    if path.is_absolute() or ".." in path.parts:
        raise InvalidBundleError(f"{source}: {name!r} must be a path inside the model folder")
    return path.as_posix()


def build_bundle(source: Path, out: Path, extra_files: tuple[str, ...] = ()) -> VerifiedBundle:
    """Copy the model folder's named files (and ``extra_files``) into ``out`` with a manifest."""
    model = load_model_dir(source)
    names = sorted(
        {_relative(f, source) for f in (*model_files(model).values(), *extra_files) if f}
    )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidBundleError(f"{out} exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in names:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target)
        entries.append(FileEntry(name, sha256_file(target), target.stat().st_size))
    manifest = Manifest(
        format=FORMAT,
        model=msgspec.structs.replace(model, directory=""),
        files=tuple(entries),
        frameworks=framework_versions(model.backend),
    )
    (out / MANIFEST_FILE).write_bytes(encode(manifest))
    return verify_bundle(out)


def describe(bundle: VerifiedBundle) -> dict[str, object]:
    """What ``warmserve bundle inspect`` prints."""
    model: ModelConfig = bundle.manifest.model
    return {
        "id": bundle.id,
        "name": model.name,
        "version": model.version,
        "backend": model.backend,
        "inputs": [msgspec.to_builtins(s) for s in model.inputs],
        "outputs": [msgspec.to_builtins(s) for s in model.outputs],
        "max_batch_size": model.max_batch_size,
        "process": model.process,
        "frameworks": bundle.manifest.frameworks,
        "files": [msgspec.to_builtins(f) for f in bundle.manifest.files],
    }
