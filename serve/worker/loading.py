"""Loading a model in the worker: its bundle verified, then its code and weights loaded from
the very bytes that were verified (never the files again, which could have been replaced
since the check)."""

from __future__ import annotations

from pathlib import Path

from serve.backends import Backend
from serve.bundles.verify import read_bundle
from serve.config import ModelConfig
from serve.worker.process import Processing


def load_model(
    model: ModelConfig, bundle_id: str, device: str, threads: int, require_gpu: bool
) -> tuple[Processing, Backend]:
    """The model's processing code and its backend. A bundle (``bundle_id``) is verified in
    full before any of its code is run or weights are read, and its code and model file are
    used as they were hashed; a plain model folder (no ``bundle_id``) is read from its files."""
    from serve.backends import load_backend  # (looked up now: tests stand a backend in)

    contents: dict[str, bytes] = {}
    if bundle_id:
        names = (model.model_file, model.process)
        _, contents = read_bundle(Path(model.directory), bundle_id, names)
    module = f"warmserve_bundle_{(bundle_id or 'source')[:12]}_{model.name}"
    processing = Processing(model, module, contents.get(_key(model.process)))
    backend = load_backend(
        model,
        device,
        threads,
        processing.build_model,
        require_gpu=require_gpu,
        model_bytes=contents.pop(_key(model.model_file), None),
    )
    return processing, backend


def _key(name: str) -> str:
    return Path(name).as_posix() if name else ""
