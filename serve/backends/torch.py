"""PyTorch backend: TorchScript archives (.pt/.ts), torch.export archives (.pt2), or
safetensors weights (.safetensors) with ``build_model(weights)`` in the bundle's process module.

None of these is an arbitrary pickle. On CUDA, warm-up captures one CUDA graph per batch bucket
and later batches replay it (MEASURED.md: 3–5× at small batches); a model that cannot be captured
runs eagerly.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from serve.backends.base import Arrays, Backend, DeviceUnavailableError, resolve_device
from serve.config import ModelConfig, page_lock_from_env
from serve.protocol.datatypes import Datatype

log = logging.getLogger(__name__)


class _Graph:
    """One captured bucket: its graph, the device tensors it reads and writes, and page-locked
    host copies of both. Copies between page-locked memory and the GPU run as DMA without the
    driver's bounce through its own staging buffer, and the input and output copies go on the
    stream with the replay, with one wait at the end rather than one per output."""

    def __init__(
        self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], outputs: list[torch.Tensor]
    ) -> None:
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs
        self.host_inputs = [torch.empty_like(t, device="cpu").pin_memory() for t in inputs]
        self.host_outputs = [torch.empty_like(t, device="cpu").pin_memory() for t in outputs]
        self.host_input_arrays = [t.numpy() for t in self.host_inputs]
        self.done = torch.cuda.Event()

    def run(
        self, arrays: list[np.ndarray[Any, Any]], rows: int, locked: tuple[int, int] | None
    ) -> list[np.ndarray[Any, Any]]:
        """The batch's ``rows`` rows through the graph of this bucket. Only those rows are copied
        each way: the rows after them keep an earlier batch's values, which only their own
        (dropped) outputs see. An input inside ``locked`` (page-locked host memory: the worker's
        arena) goes to the device straight from there; any other is staged in this bucket's
        page-locked buffer first."""
        for static, host, host_array, array in zip(
            self.inputs, self.host_inputs, self.host_input_arrays, arrays, strict=True
        ):
            if _inside(array, locked) and array.dtype == host_array.dtype:
                source = torch.from_numpy(array)
            else:
                np.copyto(host_array[:rows], array, casting="same_kind")
                source = host[:rows]
            static[:rows].copy_(source, non_blocking=True)
        self.graph.replay()
        for host, out in zip(self.host_outputs, self.outputs, strict=True):
            host[:rows].copy_(out[:rows], non_blocking=True)
        self.done.record()
        self.done.synchronize()  # the inputs are read and the outputs written: buffers are free
        # copies: the page-locked buffers are this bucket's, written again by its next batch
        return [host[:rows].numpy().copy() for host in self.host_outputs]


def _inside(array: np.ndarray[Any, Any], span: tuple[int, int] | None) -> bool:
    if span is None or not array.flags.c_contiguous:
        return False
    start: int = array.ctypes.data
    return span[0] <= start and start + array.nbytes <= span[0] + span[1]


class TorchBackend(Backend):
    name = "torch"
    fixed_shapes = True

    def __init__(
        self,
        model: ModelConfig,
        device: str,
        threads: int,
        build_model: Callable[[dict[str, torch.Tensor]], Any] | None = None,
        model_bytes: bytes | None = None,
    ) -> None:
        self._build_model = build_model
        device = resolve_device(device, torch.cuda.is_available())
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {device} is not available: torch sees no CUDA device"
            )
        super().__init__(model, device, threads)
        torch.set_num_threads(threads)
        if not model.process and any(
            s.datatype == Datatype.BYTES for s in (*model.inputs, *model.outputs)
        ):
            raise ValueError("the torch backend takes no BYTES tensors; pre-process them first")
        self._torch_device = torch.device(device)
        if device.startswith("cuda"):
            torch.cuda.set_device(self._torch_device)
        self._module = self._load(model, model_bytes)
        self._input_names = list(model.model_inputs) or [s.name for s in model.inputs]
        self._output_names = list(model.model_outputs) or [s.name for s in model.outputs]
        self._graphs: dict[tuple[tuple[int, ...], ...], _Graph] = {}
        self._locked: tuple[int, int] | None = None  # page-locked host memory (the arena)

    def _load(self, model: ModelConfig, model_bytes: bytes | None) -> Any:
        """The module, from ``model_bytes`` (the verified content) when given, else the file."""
        path = model.model_path
        source: str | io.BytesIO = str(path) if model_bytes is None else io.BytesIO(model_bytes)
        if path.suffix == ".safetensors":
            # Weights only: the architecture comes from the bundle's own process module.
            from safetensors.torch import load, load_file

            if self._build_model is None:
                raise ValueError(
                    f"{model.model_file} holds only weights: the model's process module must "
                    "define build_model(weights) returning a torch.nn.Module"
                )
            if model_bytes is None:
                weights = load_file(str(path), device=str(self._torch_device))
            else:
                weights = {k: v.to(self._torch_device) for k, v in load(model_bytes).items()}
            module = self._build_model(weights)
            return module.to(self._torch_device).eval()
        if path.suffix == ".pt2":
            program = torch.export.load(source)
            return program.module().to(self._torch_device)
        module = torch.jit.load(source, map_location=self._torch_device)
        module.eval()
        return module

    def _to_device(self, array: np.ndarray[Any, Any]) -> torch.Tensor:
        if not array.flags.writeable:
            array = array.copy()
        return torch.from_numpy(array).to(self._torch_device, non_blocking=True)

    def _outputs(self, result: Any) -> list[torch.Tensor]:
        if isinstance(result, torch.Tensor):
            result = (result,)
        elif isinstance(result, dict):
            result = tuple(result[name] for name in self._output_names)
        tensors = list(result)
        if len(tensors) != len(self._output_names):
            raise ValueError(
                f"model returned {len(tensors)} outputs, config names {len(self._output_names)}"
            )
        return tensors

    def pin_host_memory(self, address: int, size: int) -> bool:
        if self._torch_device.type != "cuda" or not page_lock_from_env():
            return False
        try:
            error = int(torch.cuda.cudart().cudaHostRegister(address, size, 0))
        except Exception as exc:  # an optimisation: staged copies still work
            log.warning(
                "cannot page-lock %d bytes of host memory (%s); copies are staged", size, exc
            )
            return False
        if error != 0:
            log.warning(
                "cudaHostRegister of %d bytes failed (error %d); copies are staged", size, error
            )
            return False
        self._locked = (address, size)
        return True

    def run_bucket(self, inputs: Arrays, bucket: int) -> Arrays:
        arrays = [inputs[name] for name in self._input_names]
        key = tuple((bucket, *a.shape[1:]) for a in arrays)
        graph = self._graphs.get(key)
        rows = arrays[0].shape[0] if arrays else 0
        if graph is None or any(a.shape[0] != rows for a in arrays):
            return super().run_bucket(inputs, bucket)
        with torch.inference_mode():
            outputs = graph.run(arrays, rows, self._locked)
        return dict(zip(self._output_names, outputs, strict=True))

    def run(self, inputs: Arrays) -> Arrays:
        arrays = [inputs[name] for name in self._input_names]
        key = tuple(tuple(a.shape) for a in arrays)
        with torch.inference_mode():
            graph = self._graphs.get(key)
            if graph is not None:
                rows = arrays[0].shape[0]
                return dict(zip(self._output_names, graph.run(arrays, rows, None), strict=True))
            outputs = self._outputs(self._module(*[self._to_device(a) for a in arrays]))
            return {
                name: out.detach().to("cpu").numpy()
                for name, out in zip(self._output_names, outputs, strict=True)
            }

    def warm(self, inputs: Arrays, repeats: int = 3) -> None:
        super().warm(inputs, repeats)
        if self._torch_device.type == "cuda":
            self._capture(inputs)

    def _capture(self, inputs: Arrays) -> None:
        arrays = [inputs[name] for name in self._input_names]
        key = tuple(tuple(a.shape) for a in arrays)
        try:
            with torch.inference_mode():
                static = [self._to_device(a) for a in arrays]
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._module(*static)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outputs = self._module(*static)
            torch.cuda.synchronize()
            captured = _Graph(graph, static, self._outputs(outputs))
        except Exception as exc:  # capture is an optimisation: eager still serves this shape
            log.warning(
                "CUDA graph capture failed for shapes %s (%s); this shape runs eagerly", key, exc
            )
            return
        self._graphs[key] = captured

    def is_fatal(self, exc: BaseException) -> bool:
        if self._torch_device.type != "cuda":
            return False
        text = str(exc)
        return (
            "CUDA error" in text or "device-side assert" in text or "illegal memory access" in text
        )

    def release_memory(self) -> None:
        if self._torch_device.type == "cuda":  # the caching allocator's free blocks
            torch.cuda.empty_cache()

    def describe(self) -> str:
        graphs = f", {len(self._graphs)} CUDA graphs" if self._graphs else ""
        return f"torch {torch.__version__} on {self.device}{graphs}"
