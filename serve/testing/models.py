"""Builders of small deterministic models and their model folders.

Imports torch and onnx inside the functions: call these from tests, or from the demo builder
subprocess, never from the serving parent process.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from serve.config import MODEL_CONFIG_FILE
from serve.testing.toml import dumps

MLP_SIZES = (64, 256, 256, 10)
IMAGE_SHAPE = (32, 32, 3)


def mlp_weights(seed: int = 1234) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    """(W, b) per layer of the demo MLP, W shaped (in, out)."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in itertools.pairwise(MLP_SIZES):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        layers.append((w, b))
    return layers


def mlp_reference(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The demo MLP computed with numpy: what every MLP demo model must return."""
    layers = mlp_weights()
    h = x.astype(np.float32)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def _script(module: Any) -> Any:
    """TorchScript-compile ``module`` (torch 2.10+ warns that TorchScript is deprecated)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_CONFIG_FILE).write_text(dumps(config))
    return folder


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def build_mlp_onnx(folder: Path, name: str = "mlp_onnx", **overrides: Any) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    current = "INPUT0"
    layers = mlp_weights()
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(layers) - 1
        out = "OUTPUT0" if last else f"h{i}"
        nodes.append(
            helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"g{i}" if not last else out])
        )
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", MLP_SIZES[0]])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", MLP_SIZES[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return write_config(folder, _mlp_config(name, "onnx", "model.onnx", overrides))


def _mlp_config(name: str, backend: str, file: str, overrides: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        "backend": backend,
        "model_file": file,
        "max_batch_size": 64,
        "device": "auto",
        "inputs": [_tensor("INPUT0", "FP32", [MLP_SIZES[0]])],
        "outputs": [_tensor("OUTPUT0", "FP32", [MLP_SIZES[-1]])],
        "pool": {"workers": 1, "threads": 1},
    }
    config.update(overrides)
    return config


def build_mlp_torch(folder: Path, name: str = "mlp_torch", **overrides: Any) -> Path:
    import torch

    layers = mlp_weights()
    modules: list[torch.nn.Module] = []
    for i, (w, b) in enumerate(layers):
        linear = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            linear.bias.copy_(torch.from_numpy(b))
        modules.append(linear)
        if i < len(layers) - 1:
            modules.append(torch.nn.ReLU())
    scripted = _script(torch.nn.Sequential(*modules).eval())
    folder.mkdir(parents=True, exist_ok=True)
    scripted.save(str(folder / "model.pt"))
    return write_config(folder, _mlp_config(name, "torch", "model.pt", overrides))


def build_mlp_export(folder: Path, name: str = "mlp_export", **overrides: Any) -> Path:
    """The demo MLP as a torch.export archive (.pt2) with a dynamic batch dimension."""
    import torch

    layers = mlp_weights()

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i, (w, b) in enumerate(layers):
                self.register_buffer(f"w{i}", torch.from_numpy(w.copy()))
                self.register_buffer(f"b{i}", torch.from_numpy(b.copy()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(x @ self.w0 + self.b0)
            h = torch.relu(h @ self.w1 + self.b1)
            return h @ self.w2 + self.b2

    batch = torch.export.Dim("batch", min=1, max=1024)
    example = (torch.zeros(2, MLP_SIZES[0]),)
    program = torch.export.export(MLP().eval(), example, dynamic_shapes=({0: batch},))
    folder.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(folder / "model.pt2"))
    return write_config(folder, _mlp_config(name, "torch", "model.pt2", overrides))


SAFETENSORS_PROCESS = """\
import torch


def build_model(weights):
    layers = []
    for i in range(3):
        w, b = weights[f"w{i}"], weights[f"b{i}"]
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        layers.append(linear)
        if i < 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)
"""


def build_mlp_safetensors(folder: Path, name: str = "mlp_safetensors", **overrides: Any) -> Path:
    """The demo MLP as safetensors weights; its architecture is in the folder's process.py."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for i, (w, b) in enumerate(mlp_weights()):
        tensors[f"w{i}"] = torch.from_numpy(w.T.copy())
        tensors[f"b{i}"] = torch.from_numpy(b.copy())
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "process.py").write_text(SAFETENSORS_PROCESS)
    overrides.setdefault("process", "process.py")
    return write_config(folder, _mlp_config(name, "torch", "model.safetensors", overrides))


def build_image_cnn(folder: Path, name: str = "image_cnn", **overrides: Any) -> Path:
    """A small CNN on uint8 HxWx3 images; scaling and normalisation are inside the model."""
    import torch

    class ImageCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(16, 32, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1),
            )
            self.head = torch.nn.Linear(32, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image.permute(0, 3, 1, 2).float() / 255.0
            x = (x - self.mean) / self.std
            return self.head(self.features(x).flatten(1))

    torch.manual_seed(7)
    scripted = _script(ImageCNN().eval())
    folder.mkdir(parents=True, exist_ok=True)
    scripted.save(str(folder / "model.pt"))
    config: dict[str, Any] = {
        "name": name,
        "backend": "torch",
        "model_file": "model.pt",
        "max_batch_size": 32,
        "device": "auto",
        "inputs": [_tensor("IMAGE", "UINT8", list(IMAGE_SHAPE))],
        "outputs": [_tensor("LOGITS", "FP32", [10])],
        "pool": {"workers": 1, "threads": 1},
    }
    config.update(overrides)
    return write_config(folder, config)


IDENTITY_TYPES = {
    "FP32": 1,
    "FP16": 10,
    "INT64": 7,
    "INT32": 6,
    "UINT8": 2,
    "BOOL": 9,
    "BYTES": 8,
}


def build_identity_onnx(
    folder: Path,
    name: str = "identity",
    types: tuple[str, ...] = tuple(IDENTITY_TYPES),
    **overrides: Any,
) -> Path:
    """One variable-length input per datatype, each echoed to OUT_<TYPE> (tests the codec)."""
    import onnx
    from onnx import helper

    inputs, outputs, nodes = [], [], []
    for datatype in types:
        onnx_type = IDENTITY_TYPES[datatype]
        inputs.append(helper.make_tensor_value_info(f"IN_{datatype}", onnx_type, ["batch", "n"]))
        outputs.append(helper.make_tensor_value_info(f"OUT_{datatype}", onnx_type, ["batch", "n"]))
        nodes.append(helper.make_node("Identity", [f"IN_{datatype}"], [f"OUT_{datatype}"]))
    model = helper.make_model(
        helper.make_graph(nodes, "identity", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    config: dict[str, Any] = {
        "name": name,
        "backend": "onnx",
        "model_file": "model.onnx",
        "max_batch_size": 8,
        "inputs": [_tensor(f"IN_{t}", t, [-1]) for t in types],
        "outputs": [_tensor(f"OUT_{t}", t, [-1]) for t in types],
        "pool": {"workers": 1, "threads": 1},
    }
    config.update(overrides)
    return write_config(folder, config)


def build_spin_torch(folder: Path, name: str = "spin", **overrides: Any) -> Path:
    """Busy for ITERS (INT64 [1]) matrix products: a controllable slow model for load tests.

    Raises (a per-batch model error) when any ITERS is negative.
    """
    import torch

    class Spin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(3)
            self.register_buffer("w", torch.randn(512, 512, generator=generator) / 32.0)

        def forward(self, x: torch.Tensor, iters: torch.Tensor) -> torch.Tensor:
            if bool((iters < 0).any()):
                raise RuntimeError("ITERS must be non-negative")
            y = x
            for _ in range(int(iters.max())):
                y = torch.tanh(y @ self.w)
            return y.sum(dim=1, keepdim=True) * 0.0 + x[:, :1]

    scripted = _script(Spin().eval())
    folder.mkdir(parents=True, exist_ok=True)
    scripted.save(str(folder / "model.pt"))
    config: dict[str, Any] = {
        "name": name,
        "backend": "torch",
        "model_file": "model.pt",
        "max_batch_size": 1,
        "inputs": [_tensor("X", "FP32", [512]), _tensor("ITERS", "INT64", [1])],
        "outputs": [_tensor("Y", "FP32", [1])],
        "batching": {"max_queue_size": 4},
        "pool": {"workers": 1, "threads": 1, "max_inflight_per_worker": 1},
    }
    config.update(overrides)
    return write_config(folder, config)


def build_demo_repository(root: Path) -> list[Path]:
    """The built-in demo models: the MLP as TorchScript and as ONNX, and a small image CNN."""
    return [
        build_mlp_torch(root / "mlp_torch"),
        build_mlp_onnx(root / "mlp_onnx"),
        build_image_cnn(root / "image_cnn"),
    ]
