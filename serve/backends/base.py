"""The small interface every backend implements, and the factory the worker calls."""

from __future__ import annotations

import abc
from typing import Any

import numpy.typing as npt

from serve.config import ModelConfig
from serve.protocol.samples import sample_arrays

Arrays = dict[str, npt.NDArray[Any]]


class Backend(abc.ABC):
    """Loads one model on one device and runs batches of numpy arrays through it."""

    name: str = ""
    #: True when inputs must be padded to a warmed batch bucket (fixed shapes: CUDA graphs,
    #: TorchScript's shape specialisation).
    fixed_shapes: bool = False

    def __init__(self, model: ModelConfig, device: str, threads: int) -> None:
        self.model = model
        self.device = device
        self.threads = threads

    @abc.abstractmethod
    def run(self, inputs: Arrays) -> Arrays:
        """Compute one batch. Inputs and outputs are keyed by the model config's tensor names."""

    def warm(self, inputs: Arrays, repeats: int = 3) -> None:
        """Run a batch shape until it is fast (allocations, autotuning, graph capture)."""
        for _ in range(repeats):
            self.run(inputs)

    def is_fatal(self, exc: BaseException) -> bool:
        """Whether ``exc`` leaves this process unable to serve (e.g. a sticky CUDA error)."""
        return False

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


def sample_inputs(model: ModelConfig, rows: int | None, seed: int = 0) -> Arrays:
    """Deterministic inputs of the model's signature (variable dims become 1)."""
    return sample_arrays([(s.name, s.datatype, s.shape) for s in model.inputs], rows, seed)


def resolve_device(requested: str, cuda_available: bool) -> str:
    if requested == "auto":
        return "cuda:0" if cuda_available else "cpu"
    return requested


def load_backend(
    model: ModelConfig, device: str, threads: int, build_model: Any | None = None
) -> Backend:
    """Construct and load the backend the model config names (imports its framework now).

    ``build_model`` (from the model's process module) builds a torch module from safetensors
    weights."""
    if model.backend == "onnx":
        from serve.backends.onnx import OnnxBackend

        return OnnxBackend(model, device, threads)
    if model.backend == "torch":
        from serve.backends.torch import TorchBackend

        return TorchBackend(model, device, threads, build_model)
    raise ValueError(f"unknown backend {model.backend!r}")
