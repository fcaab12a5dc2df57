"""A worker loads exactly the bytes of its bundle that it verified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import serve.worker.loading
from serve.bundles.build import build_bundle
from serve.bundles.verify import VerifiedBundle
from serve.errors import InvalidBundleError
from serve.testing.models import (
    build_mlp_export,
    build_mlp_onnx,
    build_mlp_safetensors,
    build_mlp_torch,
    mlp_reference,
)

BUILDERS = {
    "onnx": build_mlp_onnx,
    "torchscript": build_mlp_torch,
    "export": build_mlp_export,
    "safetensors": build_mlp_safetensors,
}
PROCESS = "def postprocess(outputs):\n    return outputs\n"


def _bundle(tmp_path: Path, kind: str) -> VerifiedBundle:
    folder = BUILDERS[kind](tmp_path / "src", name="mlp")
    config = (folder / "model.toml").read_text()
    if "process" not in config:  # (the safetensors model has its own already)
        (folder / "process.py").write_text(PROCESS)
        (folder / "model.toml").write_text('process = "process.py"\n' + config)
    return build_bundle(folder, tmp_path / "bundle")


def _swap_after_the_check(monkeypatch: pytest.MonkeyPatch, bundle: VerifiedBundle) -> None:
    """Replace the model file and the code right after the worker's check of them (a file
    copied over the cached bundle, an attacker's swap): what the load then gets."""
    real = serve.worker.loading.read_bundle

    def check_then_swap(*args: Any) -> Any:
        checked = real(*args)
        model = bundle.path / bundle.manifest.model.model_file
        model.unlink()  # (a new file, as a copy or a rename puts there)
        model.write_bytes(b"not the model that was verified")
        (bundle.path / bundle.manifest.model.process).write_text("raise SystemExit('swapped')\n")
        return checked

    monkeypatch.setattr(serve.worker.loading, "read_bundle", check_then_swap)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_files_swapped_after_the_check_are_not_what_the_worker_loads(tmp_path, monkeypatch, kind):
    bundle = _bundle(tmp_path, kind)
    _swap_after_the_check(monkeypatch, bundle)
    model = bundle.model
    processing, backend = serve.worker.loading.load_model(model, bundle.id, "cpu", 1, False)
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    outputs = processing.postprocess(backend.run(processing.preprocess({"INPUT0": x})))
    np.testing.assert_allclose(outputs["OUTPUT0"], mlp_reference(x), rtol=1e-4, atol=1e-5)


def test_a_bundle_changed_before_the_check_is_refused_naming_the_file(tmp_path):
    bundle = _bundle(tmp_path, "onnx")
    (bundle.path / "model.onnx").write_bytes(b"changed before the worker started")
    with pytest.raises(InvalidBundleError, match=r"model\.onnx does not match"):
        serve.worker.loading.load_model(bundle.model, bundle.id, "cpu", 1, False)


@pytest.mark.parametrize("folder", ["", "onnx/"])
def test_an_onnx_model_with_external_data_loads_from_its_bundle(tmp_path, folder):
    # The external data lies beside the model file, which may be in a folder of the bundle:
    # from bytes, onnxruntime must be told that folder (the model file's, not the bundle's).
    import onnx

    source = build_mlp_onnx(tmp_path / "src", name="mlp")
    graph = onnx.load(str(source / "model.onnx"))
    (source / "model.onnx").unlink()
    (source / folder).mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        graph,
        str(source / folder / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    config = (source / "model.toml").read_text()
    (source / "model.toml").write_text(config.replace('"model.onnx"', f'"{folder}model.onnx"'))
    bundle = build_bundle(source, tmp_path / "bundle", (f"{folder}model.onnx.data",))
    processing, backend = serve.worker.loading.load_model(bundle.model, bundle.id, "cpu", 1, False)
    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    outputs = processing.postprocess(backend.run(processing.preprocess({"INPUT0": x})))
    np.testing.assert_allclose(outputs["OUTPUT0"], mlp_reference(x), rtol=1e-4, atol=1e-5)
