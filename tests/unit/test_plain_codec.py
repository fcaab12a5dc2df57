"""The front end's short path for the common request (PlainCodec) accepts exactly the requests the
general path accepts, with the same arrays, and answers with the same message; every other
request falls through to the general path (decode() gives None) and gets its errors there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from serve.config import ModelConfig, TensorSpec
from serve.errors import ServeError
from serve.frontend.convert import PlainCodec, infer_request_from_pb, infer_response_to_pb
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.model_service import ModelService
from serve.protocol import Datatype, InferResponse, Tensor

TWO_INPUTS = ModelConfig(
    name="two",
    backend="onnx",
    model_file="m.onnx",
    inputs=(TensorSpec("A", "FP32", (3,)), TensorSpec("B", "INT64", (2, 2))),
    outputs=(TensorSpec("Y", "FP32", (1,)), TensorSpec("Z", "INT32", (2,))),
    max_batch_size=4,
)
UNBATCHED = ModelConfig(
    name="flat",
    backend="onnx",
    model_file="m.onnx",
    inputs=(TensorSpec("A", "FP32", (2, 3)),),
    outputs=(TensorSpec("Y", "FP32", (2,)),),
)
VARIABLE = ModelConfig(
    name="variable",
    backend="onnx",
    model_file="m.onnx",
    inputs=(TensorSpec("A", "FP32", (-1,)),),
    outputs=(TensorSpec("Y", "FP32", (1,)),),
    max_batch_size=4,
)
WITH_BYTES = ModelConfig(
    name="text",
    backend="onnx",
    model_file="m.onnx",
    inputs=(TensorSpec("A", "FP32", (1,)), TensorSpec("S", "BYTES", (1,))),
    outputs=(TensorSpec("Y", "FP32", (1,)),),
    max_batch_size=4,
)

Edit = Callable[[Any], None]


def _request(model: ModelConfig, rows: int | None) -> Any:
    """A valid raw request for ``model``: ``rows`` rows (None: no batch axis)."""
    request = pb.ModelInferRequest(model_name=model.name, id="r-1")
    for i, spec in enumerate(model.inputs):
        shape = ([] if rows is None else [rows]) + [max(d, 2) for d in spec.shape]
        dtype = np.dtype(np.float32 if spec.datatype == "FP32" else np.int64)
        array = (np.arange(int(np.prod(shape))) + 10 * i).astype(dtype).reshape(shape)
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def _general(model: ModelConfig, request: Any) -> tuple[list[Any], int] | None:
    """What the general path makes of ``request``: the checked arrays, or None for an error."""
    service = ModelService(model)
    try:
        return service.prepare(infer_request_from_pb(request, None))
    except ServeError:
        return None


def _set(field: str, value: Any) -> Edit:
    return lambda r: setattr(r.inputs[0], field, value)


def _shape(*dims: int) -> Edit:
    def edit(request: Any) -> None:
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend(dims)

    return edit


def _swap_inputs(request: Any) -> None:
    first, second = (pb.ModelInferRequest.InferInputTensor() for _ in range(2))
    first.CopyFrom(request.inputs[0])
    second.CopyFrom(request.inputs[1])
    raw = list(request.raw_input_contents)
    del request.inputs[:]
    del request.raw_input_contents[:]
    request.inputs.extend([second, first])
    request.raw_input_contents.extend([raw[1], raw[0]])


def _one_row_of_the_first(request: Any) -> None:
    _shape(1, 3)(request)
    request.raw_input_contents[0] = request.raw_input_contents[0][:12]


def _typed_too(request: Any) -> None:
    request.inputs[0].contents.fp32_contents.append(1.0)


def _short_raw(request: Any) -> None:
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]


PLAIN_VALID: list[tuple[ModelConfig, int | None]] = [
    (TWO_INPUTS, 1),
    (TWO_INPUTS, 4),
    (UNBATCHED, None),
]

# (model, rows, edit, whether the general path accepts the edited request)
FALLS_THROUGH: list[tuple[str, ModelConfig, int | None, Edit, bool]] = [
    ("inputs in another order", TWO_INPUTS, 2, _swap_inputs, True),
    ("an output named", TWO_INPUTS, 2, lambda r: r.outputs.add(name="Y"), True),
    ("a parameter", TWO_INPUTS, 2, lambda r: r.parameters["x"].CopyFrom(pb.InferParameter()), True),
    ("a variable dimension", VARIABLE, 2, lambda r: None, True),
    ("a BYTES input", WITH_BYTES, 1, lambda r: None, False),  # (this request's BYTES is not)
    (
        "typed contents",
        TWO_INPUTS,
        2,
        lambda r: r.raw_input_contents.__delitem__(slice(None)),
        False,
    ),
    ("an unknown name", TWO_INPUTS, 2, _set("name", "C"), False),
    ("another datatype", TWO_INPUTS, 2, _set("datatype", "FP64"), False),
    ("a datatype spelt otherwise", TWO_INPUTS, 2, _set("datatype", "fp32"), False),
    (
        "typed and raw contents",
        TWO_INPUTS,
        2,
        lambda r: r.inputs[0].contents.fp32_contents.append(1),
        False,
    ),
    ("a wrong inner shape", TWO_INPUTS, 2, _shape(2, 1, 3), False),  # the same byte count
    ("no batch axis", TWO_INPUTS, 2, _shape(3), False),
    ("a scalar", TWO_INPUTS, 2, _shape(), False),
    ("zero rows", TWO_INPUTS, 0, lambda r: None, False),
    ("more rows than max_batch_size", TWO_INPUTS, 5, lambda r: None, False),
    ("inputs with different rows", TWO_INPUTS, 2, _one_row_of_the_first, False),
    ("a negative dimension", TWO_INPUTS, 2, _shape(-2, 3), False),
    (
        "raw bytes short of the shape",
        TWO_INPUTS,
        2,
        lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 23),
        False,
    ),
    ("an input missing", TWO_INPUTS, 2, lambda r: r.inputs.__delitem__(1), False),
    ("an unbatched model sent rows", UNBATCHED, None, _shape(1, 2, 3), False),
]


@pytest.mark.parametrize(("model", "rows"), PLAIN_VALID)
def test_a_plain_request_gives_the_general_paths_arrays(model, rows):
    request = _request(model, rows)
    plain = PlainCodec(model, {}).decode(request, request.raw_input_contents)
    general = _general(model, request)
    assert plain is not None and general is not None
    assert plain[1] == general[1] == (rows or 1)
    for ours, theirs in zip(plain[0], general[0], strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("model", "rows", "edit", "accepted"),
    [case[1:] for case in FALLS_THROUGH],
    ids=[case[0] for case in FALLS_THROUGH],
)
def test_any_other_request_falls_through_to_the_general_path(model, rows, edit, accepted):
    request = _request(model, rows)
    edit(request)
    assert PlainCodec(model, {}).decode(request, request.raw_input_contents) is None
    assert (_general(model, request) is not None) is accepted


def test_raw_inputs_passed_apart_from_the_request_are_decoded_in_place():
    request = _request(TWO_INPUTS, 2)
    raw = [memoryview(bytearray(data)) for data in request.raw_input_contents]
    del request.raw_input_contents[:]
    plain = PlainCodec(TWO_INPUTS, {}).decode(request, raw)
    assert plain is not None
    raw[0][:4] = np.float32(7.5).tobytes()  # a view of the caller's memory, not a copy
    assert plain[0][0][0, 0] == 7.5


@pytest.mark.parametrize("parameters", [{}, {"bundle_id": "sha256:abc"}])
def test_the_answer_is_the_general_paths_message(parameters):
    request = _request(TWO_INPUTS, 2)
    outputs = [np.array([[1.5], [2.5]], np.float32), np.array([[1, 2], [3, 4]], np.int32)]
    ours = PlainCodec(TWO_INPUTS, parameters).encode(request, outputs)
    theirs = infer_response_to_pb(
        InferResponse(
            "two",
            "1",
            [Tensor("Y", Datatype.FP32, outputs[0]), Tensor("Z", Datatype.INT32, outputs[1])],
            "r-1",
            dict(parameters),
        )
    )
    assert ours == theirs
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )


def test_a_variable_answer_reservation_follows_the_answers_up_at_once_and_down_slowly():
    from serve.frontend.convert import ANSWER_ESTIMATE_DECAY

    def codec(shape: list[int]) -> PlainCodec:
        model = ModelConfig(
            name="m", backend="onnx", model_file="m.onnx", max_batch_size=8,
            inputs=(TensorSpec("X", "FP32", (4,)),),
            outputs=(TensorSpec("Y", "FP32", tuple(shape)),),
        )  # fmt: skip
        return PlainCodec(model, {})

    fixed = codec([3])
    assert fixed.answer_fixed and fixed.answer_row_bytes == 3 * 4 * 3  # ANSWER_COPIES of 3 FP32
    fixed.learn_answer(2, 10_000)
    assert fixed.answer_row_bytes == 36  # the config decides

    variable = codec([-1])
    assert not variable.answer_fixed and variable.answer_row_bytes == 0  # nothing known yet
    variable.learn_answer(2, 1001)
    assert variable.answer_row_bytes == 501  # per row, rounded up
    variable.learn_answer(1, 100)
    assert variable.answer_row_bytes == int(501 * ANSWER_ESTIMATE_DECAY)  # down slowly
    variable.learn_answer(4, 8000)
    assert variable.answer_row_bytes == 2000  # up at once
