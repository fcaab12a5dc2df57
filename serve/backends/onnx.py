"""ONNX Runtime backend: the CUDA execution provider for a CUDA device, else the CPU's.

A CUDA device (``cuda:N``, or ``auto`` on a build with the CUDA provider) is CUDA or nothing:
onnxruntime quietly runs a session on CPU when the CUDA provider is missing or fails to start (a
broken driver), and a GPU pod would serve, ready, many times slower. The load fails instead."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from serve.backends.base import Arrays, Backend, DeviceUnavailableError, resolve_device
from serve.config import ModelConfig
from serve.errors import InvalidInputError

CUDA_PROVIDER = "CUDAExecutionProvider"


def choose_providers(device: str, available: list[str]) -> tuple[str, list[Any]]:
    """The device used and the provider list for it (``auto``: CUDA when its provider is
    installed, else CPU). A CUDA device without the CUDA provider raises DeviceUnavailableError."""
    device = resolve_device(device, CUDA_PROVIDER in available)
    if not device.startswith("cuda"):
        return "cpu", ["CPUExecutionProvider"]
    if CUDA_PROVIDER not in available:
        raise DeviceUnavailableError(
            f"device {device} is not available: this onnxruntime has no {CUDA_PROVIDER} "
            f"(its providers: {', '.join(available)}); install onnxruntime-gpu"
        )
    index = int(device.partition(":")[2] or 0)
    return device, [(CUDA_PROVIDER, {"device_id": index}), "CPUExecutionProvider"]


def check_session_device(device: str, session_providers: list[str]) -> None:
    """Raise DeviceUnavailableError when a session meant for CUDA got no CUDA provider:
    onnxruntime falls back to CPU (with only a log line) when the provider fails to start."""
    if device.startswith("cuda") and CUDA_PROVIDER not in session_providers:
        raise DeviceUnavailableError(
            f"device {device} is not available: onnxruntime's {CUDA_PROVIDER} did not start "
            f"(a driver or CUDA library problem; onnxruntime logged why) and the session would "
            f"run on {', '.join(session_providers)}"
        )


class OnnxBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self, model: ModelConfig, device: str, threads: int, model_bytes: bytes | None = None
    ) -> None:
        device, providers = choose_providers(device, ort.get_available_providers())
        super().__init__(model, device, threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads burn cores that other workers and the front end need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source: str | bytes = str(model.model_path)
        if model_bytes is not None:  # the bytes the bundle's hash was checked on
            source = model_bytes
            # (a graph with external data finds it beside the model file, as from a path: the
            # model file's folder, which may be a folder of the bundle's)
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path",
                str(model.model_path.parent),
            )
        self._session = ort.InferenceSession(source, options, providers=providers)
        check_session_device(device, self._session.get_providers())
        graph_inputs = {i.name for i in self._session.get_inputs()}
        graph_outputs = {o.name for o in self._session.get_outputs()}
        input_names = list(model.model_inputs) or [s.name for s in model.inputs]
        output_names = list(model.model_outputs) or [s.name for s in model.outputs]
        missing = [n for n in input_names if n not in graph_inputs]
        missing += [n for n in output_names if n not in graph_outputs]
        if missing:
            raise ValueError(
                f"{model.model_file} has no tensors named {missing}; "
                f"graph inputs {sorted(graph_inputs)}, outputs {sorted(graph_outputs)}"
            )
        self._output_names = output_names
        # After a batch ran out of memory: the next run shrinks the memory arenas back
        # (release_memory); None on every other run.
        self._run_options: ort.RunOptions | None = None
        # no string tensors in or out: run() hands arrays straight through
        self._plain = not any(
            "string" in t.type for t in (*self._session.get_inputs(), *self._session.get_outputs())
        )

    def run(self, inputs: Arrays) -> Arrays:
        options, self._run_options = self._run_options, None
        if self._plain:
            results = self._session.run(self._output_names, inputs, options)
            return dict(zip(self._output_names, results, strict=True))
        # onnxruntime takes and returns string tensors as str; the protocol's BYTES are bytes
        feed = {
            name: _strings(name, a) if a.dtype == np.object_ else a for name, a in inputs.items()
        }
        results = self._session.run(self._output_names, feed, options)
        out: Arrays = {}
        for name, value in zip(self._output_names, results, strict=True):
            array = np.asarray(value)
            if array.dtype.kind in ("O", "U"):
                array = np.vectorize(_to_bytes, otypes=[np.object_])(array)
            out[name] = array
        return out

    def release_memory(self) -> None:
        """onnxruntime frees nothing on request: its arenas keep what the failed batch made them
        grow by. The next run shrinks them back to what that run uses."""
        arenas = "cpu:0"
        if self.device.startswith("cuda"):
            arenas += f";gpu:{self.device.partition(':')[2] or 0}"
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        self._run_options = options

    def describe(self) -> str:
        return (
            f"onnxruntime {ort.__version__} on {self.device} ({self._session.get_providers()[0]})"
        )


def _strings(name: str, array: Any) -> Any:
    """A BYTES input as onnxruntime takes it (str); bytes that are not UTF-8 are the caller's
    error (INVALID_ARGUMENT), not the model's."""
    try:
        return np.vectorize(_to_str, otypes=[np.object_])(array)
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"input {name!r}: an element is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "ONNX string tensors hold text"
        ) from None


def _to_str(item: object) -> str:
    return item.decode() if isinstance(item, bytes) else str(item)


def _to_bytes(item: object) -> bytes:
    return item.encode() if isinstance(item, str) else bytes(item)  # type: ignore[call-overload]
