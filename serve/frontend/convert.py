"""Protobuf ⇄ internal types for inference. Wire-format checks live here: element counts, raw
byte sizes, typed-content fields."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from serve.config import ModelConfig
from serve.errors import InvalidInputError, UnsupportedError
from serve.frontend.admission import expected_answer_bytes
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.typed import typed_array
from serve.protocol import InferRequest, InferResponse, Tensor
from serve.protocol.datatypes import (
    Datatype,
    bytes_tensor_from_raw,
    bytes_tensor_to_raw,
    numpy_dtype,
    parse_datatype,
)

# The InferTensorContents field that carries each datatype when sent typed (FP16 has none).
CONTENTS_FIELD: dict[Datatype, str] = {
    Datatype.BOOL: "bool_contents",
    Datatype.INT8: "int_contents",
    Datatype.INT16: "int_contents",
    Datatype.INT32: "int_contents",
    Datatype.INT64: "int64_contents",
    Datatype.UINT8: "uint_contents",
    Datatype.UINT16: "uint_contents",
    Datatype.UINT32: "uint_contents",
    Datatype.UINT64: "uint64_contents",
    Datatype.FP32: "fp32_contents",
    Datatype.FP64: "fp64_contents",
    Datatype.BYTES: "bytes_contents",
}


# The parameter that puts an input's data, or an output's, in a registered shared-memory region.
SHARED_MEMORY_REGION = "shared_memory_region"
NO_SHARED_MEMORY = "the shared-memory extension is not supported by this server"

# Triton's request parameter (the schedule-policy extension) that gives the request its own
# timeout, in microseconds: an int64 (tritonclient's ``timeout=``); 0 means none.
TIMEOUT = "timeout"

# The most dimensions a tensor may have: numpy's limit (32 before numpy 2, which allows 64).
MAX_DIMS = 32

# The most elements a shape may span, zero dimensions left out: numpy's limit on an array's
# bytes (a signed 64-bit size) at 8 bytes an element.
MAX_SPAN = (2**63 - 1) // 8

_DATATYPES = {d.value: d for d in Datatype}
_FIXED_DTYPES: dict[Datatype, np.dtype[Any]] = {
    d: numpy_dtype(d) for d in Datatype if d is not Datatype.BYTES
}


def _parameters(params: Any) -> dict[str, Any]:
    """A map of InferParameter / ModelRepositoryParameter (both a ``parameter_choice`` oneof)
    → plain values."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(value, kind)
    return out


def _decode_input(tensor: Any, raw: bytes | memoryview | None) -> Tensor:
    name = tensor.name
    datatype = _DATATYPES.get(tensor.datatype)
    if datatype is None:
        try:
            datatype = parse_datatype(tensor.datatype)
        except ValueError as exc:
            raise InvalidInputError(f"input {name!r}: {exc}") from None
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS:  # (numpy cannot make such an array: an internal error otherwise)
        raise InvalidInputError(
            f"input {name!r}: shape has {len(shape)} dimensions; at most {MAX_DIMS} are supported"
        )
    count = 1
    span = 1  # the elements without its zero dimensions: numpy refuses a shape past its limit
    for d in shape:
        if d < 0:
            raise InvalidInputError(f"input {name!r}: shape {list(shape)} has a negative dimension")
        count *= d
        span *= d or 1
    if span > MAX_SPAN:
        raise InvalidInputError(f"input {name!r}: shape {list(shape)} is larger than any tensor")
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInputError(f"input {name!r}: has both typed contents and raw contents")
        return Tensor(name, datatype, _from_raw(name, datatype, shape, count, raw))
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInputError(
            f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"input {name!r}: shape {list(shape)} needs {count} elements, {field} has {len(values)}"
        )
    try:
        if datatype is Datatype.BYTES:
            array: npt.NDArray[Any] = np.empty(count, dtype=np.object_)
            array[:] = list(values)
        else:
            array = typed_array(tensor.contents, field, numpy_dtype(datatype), count)
    except (OverflowError, ValueError) as exc:
        raise InvalidInputError(
            f"input {name!r}: value out of range for {datatype}: {exc}"
        ) from None
    return Tensor(name, datatype, array.reshape(shape))


def _from_raw(
    name: str, datatype: Datatype, shape: tuple[int, ...], count: int, raw: bytes | memoryview
) -> Any:
    dtype = _FIXED_DTYPES.get(datatype)
    if dtype is None:  # BYTES
        try:
            return bytes_tensor_from_raw(raw, count).reshape(shape)
        except ValueError as exc:
            raise InvalidInputError(f"input {name!r}: malformed BYTES data: {exc}") from None
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(
            f"input {name!r}: raw data has {len(raw)} bytes, expected {expected} "
            f"for shape {list(shape)} of {datatype}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def repository_parameters(params: Any) -> dict[str, Any]:
    """ModelRepositoryParameter map → plain values."""
    return _parameters(params)


def infer_request_from_pb(
    request: Any,
    time_remaining: float | None,
    raw_inputs: Sequence[bytes | memoryview] | None = None,
) -> InferRequest:
    """``raw_inputs``, when given, stand for the request's raw_input_contents."""
    raw = request.raw_input_contents if raw_inputs is None else raw_inputs
    tensors = request.inputs
    for tensor in tensors:  # (before the counts: such an input has no data in the request)
        if SHARED_MEMORY_REGION in tensor.parameters:
            raise UnsupportedError(
                f"input {tensor.name!r} is in a shared-memory region: {NO_SHARED_MEMORY}; "
                "send it in raw_input_contents"
            )
    if raw:
        if len(raw) != len(tensors):
            raise InvalidInputError(
                f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; "
                "send every input raw or none"
            )
        inputs = [_decode_input(tensor, data) for tensor, data in zip(tensors, raw, strict=True)]
    else:
        inputs = [_decode_input(tensor, None) for tensor in tensors]
    outputs = None
    if request.outputs:
        outputs = []
        for out in request.outputs:
            if "classification" in out.parameters:
                raise UnsupportedError(
                    f"output {out.name!r}: the classification extension is not supported"
                )
            if SHARED_MEMORY_REGION in out.parameters:  # it would never be written there
                raise UnsupportedError(
                    f"output {out.name!r} is asked for in a shared-memory region: "
                    f"{NO_SHARED_MEMORY}; read it from the response (raw_output_contents)"
                )
            outputs.append(out.name)
    now = time.monotonic()
    deadline = None if time_remaining is None else now + time_remaining
    timed = False  # gRPC ends the call at its deadline itself
    timeout_us = request_timeout_us(request.parameters) if request.parameters else 0
    if timeout_us and (deadline is None or now + timeout_us / 1e6 < deadline):
        deadline, timed = now + timeout_us / 1e6, True  # ours to end: gRPC would not
    return InferRequest(
        request.model_name,
        inputs,
        request.model_version,
        request.id,
        outputs,
        _parameters(request.parameters) if request.parameters else {},
        deadline,
        timed=timed,
    )


def request_timeout_us(params: Any) -> int:
    """The request's ``timeout`` parameter in microseconds (0: none). As in Triton, the request
    fails DEADLINE_EXCEEDED once it has not finished within it, queued or computing; the earlier
    of it and the call's gRPC deadline holds."""
    if TIMEOUT not in params:
        return 0
    value = params[TIMEOUT]
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInputError(
            f"parameter {TIMEOUT!r} must be a whole number of microseconds (int64_param), "
            f"got {kind or 'no value'}"
        )
    timeout_us = int(getattr(value, kind))
    if timeout_us < 0:
        raise InvalidInputError(
            f"parameter {TIMEOUT!r} is {timeout_us}: give the request's timeout in "
            "microseconds, or 0 for none"
        )
    return timeout_us


def infer_response_to_pb(response: InferResponse) -> Any:
    outputs = ((t.name, t.datatype.value, t.data) for t in response.outputs)
    return _response(
        response.model_name, response.model_version, response.id, outputs, response.parameters
    )


def _response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Iterable[tuple[str, str, Any]],
    parameters: dict[str, Any],
) -> Any:
    """A ModelInferResponse of raw outputs, each (name, datatype, array)."""
    message = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id
    )
    add_output = message.outputs.add
    raw = message.raw_output_contents
    for name, datatype, data in outputs:
        add_output(name=name, datatype=datatype, shape=data.shape)
        if datatype == "BYTES":
            raw.append(bytes_tensor_to_raw(data))
        else:
            raw.append(data.tobytes())  # C order, whatever the array's layout
    if parameters:
        _set_parameters(message.parameters, parameters)
    return message


def _set_parameters(target: Any, parameters: dict[str, Any]) -> None:
    """Plain values → an InferParameter map."""
    for key, value in parameters.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value


# Per answer, a learned answer reservation falls by this factor at most (by half in ~70 answers)
ANSWER_ESTIMATE_DECAY = 0.99


class PlainCodec:
    """The common request of one model version, decoded and answered without intermediate
    objects: every input in raw_input_contents, in the model's order, of its datatypes and
    shapes, with no parameters and no outputs named. decode() checks exactly what the general
    path (infer_request_from_pb, then ModelService.prepare) checks, and returns None for any
    other request, which then takes the general path and gets its errors from there."""

    __slots__ = (
        "_batched",
        "_inputs",
        "_max_rows",
        "_outputs",
        "_parameters",
        "_version",
        "answer_fixed",
        "answer_row_bytes",
    )

    def __init__(self, model: ModelConfig, parameters: dict[str, Any]) -> None:
        self._batched = model.max_batch_size > 0
        self._max_rows = model.max_batch_size
        self._version = model.version
        self._parameters = parameters
        # name, datatype, dtype, shape after the batch axis (None where a dimension varies)
        self._inputs: list[tuple[str, str, np.dtype[Any], tuple[int, ...] | None]] = []
        for spec in model.inputs:
            datatype = Datatype(spec.datatype)
            if datatype is Datatype.BYTES:  # variable-size elements: the general path
                self._inputs = []
                break
            fixed = None if any(d < 0 for d in spec.shape) else tuple(spec.shape)
            self._inputs.append((spec.name, spec.datatype, _FIXED_DTYPES[datatype], fixed))
        self._outputs = [(s.name, Datatype(s.datatype).value) for s in model.outputs]
        # What a row's answer will hold, reserved in the in-flight budget: fixed by the config,
        # or (an output of variable size) learned from the answers made so far (learn_answer)
        self.answer_row_bytes = expected_answer_bytes(model)
        self.answer_fixed = self.answer_row_bytes > 0

    def learn_answer(self, rows: int, size: int) -> None:
        """An answer of ``rows`` rows held ``size`` bytes (admission.answer_bytes). Where the
        config does not fix the answers' size, the reservation per row follows them: up at once
        to a larger answer, down slowly (ANSWER_ESTIMATE_DECAY per answer), so a burst of
        requests is counted with the answers it will make before any of them exists."""
        if self.answer_fixed:
            return
        per_row = -(-size // max(1, rows))  # (rounded up)
        decayed = int(self.answer_row_bytes * ANSWER_ESTIMATE_DECAY)
        self.answer_row_bytes = max(per_row, decayed)

    def decode(
        self, request: Any, raw: Sequence[bytes | memoryview]
    ) -> tuple[list[Any], int] | None:
        """The inputs in model order and the row count, or None: not this shape of request, or
        not valid (the general path says why)."""
        specs = self._inputs
        tensors = request.inputs
        if (
            not specs
            or len(raw) != len(specs)
            or len(tensors) != len(specs)
            or request.outputs
            or request.parameters
        ):
            return None
        arrays: list[Any] = []
        rows = -1
        batched = self._batched
        for (name, datatype, dtype, fixed), tensor, data in zip(specs, tensors, raw, strict=True):
            if tensor.name != name or tensor.datatype != datatype or tensor.HasField("contents"):
                return None
            shape = tuple(tensor.shape)
            if batched:
                if not shape or shape[1:] != fixed:  # (None, a varying shape, equals none)
                    return None
                if rows < 0:
                    rows = shape[0]
                    if not 1 <= rows <= self._max_rows:
                        return None
                elif shape[0] != rows:
                    return None
            elif shape != fixed:
                return None
            count = 1
            for d in shape:
                count *= d
            if len(data) != count * dtype.itemsize:  # (no dimension is 0: rows ≥ 1, config)
                return None
            arrays.append(np.frombuffer(data, dtype=dtype).reshape(shape))
        return arrays, rows if batched else 1

    def encode(self, request: Any, outputs: Sequence[Any]) -> Any:
        """The response to ``request``: every output, in the model's order."""
        named = ((n, t, data) for (n, t), data in zip(self._outputs, outputs, strict=True))
        return _response(request.model_name, self._version, request.id, named, self._parameters)


def loopback_request(model: ModelConfig, inputs: list[Any]) -> Any:
    """A raw-contents ModelInferRequest for ``model`` carrying ``inputs`` (in model order)."""
    message = pb.ModelInferRequest(model_name=model.name, id="warmserve-loopback")
    for spec, array in zip(model.inputs, inputs, strict=True):
        message.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(array.shape))
        datatype = Datatype(spec.datatype)
        if datatype is Datatype.BYTES:
            message.raw_input_contents.append(bytes_tensor_to_raw(array))
        else:
            message.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return message
