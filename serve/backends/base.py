"""The small interface every backend implements, and the factory the worker calls."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import numpy.typing as npt

from serve.config import ModelConfig
from serve.protocol.samples import sample_arrays

Arrays = dict[str, npt.NDArray[Any]]

# How the frameworks say memory ran out, where no exception type says it: CUDA's own
# ("out of memory", as torch's "CUDA out of memory" and onnxruntime's "CUDA failure 2: out of
# memory" quote it), onnxruntime's arenas ("Failed to allocate memory for requested buffer"),
# cuBLAS's and cuDNN's workspaces.
OUT_OF_MEMORY_TEXT = (
    "out of memory",
    "failed to allocate memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
)


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, says that memory
    ran out: the host's (MemoryError, numpy's included) or a device's (torch's OutOfMemoryError,
    or the messages of OUT_OF_MEMORY_TEXT). Not a sticky device error: the process can go on
    serving batches that fit."""
    for _ in range(8):  # (a chain is short; a cycle must not loop)
        if exc is None:
            return False
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            return True
        text = str(exc).lower()
        if any(words in text for words in OUT_OF_MEMORY_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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

    def run_bucket(self, inputs: Arrays, bucket: int) -> Arrays:
        """Compute a batch of fewer rows than (or as many as) ``bucket`` on the shape warmed for
        ``bucket`` rows. Outputs may hold padding rows after the batch's own: the caller keeps
        the first rows. This default pads each input by repeating its last row."""
        return self.run({name: pad_rows(array, bucket) for name, array in inputs.items()})

    def pin_host_memory(self, address: int, size: int) -> bool:
        """Offer ``size`` bytes of host memory at ``address`` (the worker's shared input arena)
        to the device for direct copies; True when the backend took it. Default: no device to
        copy to."""
        return False

    def warm(self, inputs: Arrays, repeats: int = 3) -> None:
        """Run a batch shape until it is fast (allocations, autotuning, graph capture)."""
        for _ in range(repeats):
            self.run(inputs)

    def is_fatal(self, exc: BaseException) -> bool:
        """Whether ``exc`` leaves this process unable to serve (e.g. a sticky CUDA error)."""
        return False

    def release_memory(self) -> None:
        """A batch ran out of memory: give back what the framework caches, so that the next
        (smaller) batches find it. Default: nothing cached."""
        return

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


def pad_rows(array: npt.NDArray[Any], rows: int) -> npt.NDArray[Any]:
    """Repeat the last row so the batch has ``rows`` rows (padding rows are dropped later)."""
    extra = rows - array.shape[0]
    if extra <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], extra, axis=0)], axis=0)


def sample_inputs(model: ModelConfig, rows: int | None, seed: int = 0) -> Arrays:
    """Deterministic inputs of the model's signature (variable dims become 1)."""
    return sample_arrays([(s.name, s.datatype, s.shape) for s in model.inputs], rows, seed)


class DeviceUnavailableError(RuntimeError):
    """The CUDA device a model must run on is not there (no device, no CUDA provider, or the
    provider failed to initialise). The worker's start fails: it never runs on CPU instead."""


def resolve_device(requested: str, cuda_available: bool) -> str:
    """``auto``: the first GPU when there is one, else the CPU; ``cuda``: the first GPU. ``cpu``
    and ``cuda:N`` stand: a backend refuses ``cuda:N`` it cannot have (DeviceUnavailableError)."""
    if requested == "auto":
        return "cuda:0" if cuda_available else "cpu"
    if requested == "cuda":
        return "cuda:0"
    return requested


def load_backend(
    model: ModelConfig,
    device: str,
    threads: int,
    build_model: Any | None = None,
    *,
    require_gpu: bool = False,
    model_bytes: bytes | None = None,
) -> Backend:
    """Construct and load the backend the model config names (imports its framework now).

    ``build_model`` (from the model's process module) builds a torch module from safetensors
    weights. With ``require_gpu`` (the server's WARMSERVE_REQUIRE_GPU) device ``auto`` must be
    CUDA: the backend is asked for ``cuda:0``, what ``auto`` picks when there is a GPU, and
    refuses it loudly when there is none. ``model_bytes``: the model file's content as it was
    verified (a bundle's); the file is then not opened again. None: loaded from its path."""
    if require_gpu and device == "auto":
        try:
            return _load(model, "cuda:0", threads, build_model, model_bytes)
        except DeviceUnavailableError as exc:
            raise DeviceUnavailableError(
                f"model {model.name!r} must run on a GPU (WARMSERVE_REQUIRE_GPU is set and its "
                f"device is 'auto'), but {exc}"
            ) from None
    return _load(model, device, threads, build_model, model_bytes)


def _load(
    model: ModelConfig,
    device: str,
    threads: int,
    build_model: Any | None,
    model_bytes: bytes | None,
) -> Backend:
    if model.backend == "onnx":
        from serve.backends.onnx import OnnxBackend

        return OnnxBackend(model, device, threads, model_bytes)
    if model.backend == "torch":
        from serve.backends.torch import TorchBackend

        return TorchBackend(model, device, threads, build_model, model_bytes)
    raise ValueError(f"unknown backend {model.backend!r}")
