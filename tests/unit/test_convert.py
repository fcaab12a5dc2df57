"""The general path's wire-format checks (infer_request_from_pb): malformed requests are the
caller's error, with a message naming the input, never an internal error."""

from __future__ import annotations

import pytest

from serve.errors import InvalidInputError
from serve.frontend.convert import MAX_DIMS, infer_request_from_pb
from serve.frontend.pb import grpc_service_pb2 as pb


def _raw(shape: list[int], data: bytes, datatype: str = "FP32") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="X", datatype=datatype, shape=shape)
    request.raw_input_contents.append(data)
    return request


def _typed(shape: list[int], values: list[float]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="X", datatype="FP32", shape=shape).contents.fp32_contents.extend(values)
    return request


@pytest.mark.parametrize(
    "request_",
    [
        _raw([1] * 70, b"\x00" * 4),
        _raw([1] * 70, b"\x01\x00\x00\x00a", "BYTES"),
        _typed([1] * 70, [1.0]),
    ],
    ids=["raw", "bytes", "typed"],
)
def test_a_shape_of_more_dimensions_than_any_array_can_have_is_invalid_input(request_):
    with pytest.raises(InvalidInputError, match=r"input 'X': shape has 70 dimensions"):
        infer_request_from_pb(request_, None)


def test_the_largest_rank_allowed_still_decodes():
    request = infer_request_from_pb(_raw([1] * MAX_DIMS, b"\x00" * 4), None)
    assert request.inputs[0].data.ndim == MAX_DIMS


@pytest.mark.parametrize(
    "request_",
    [
        _raw([0, 2**62], b""),
        _raw([0, 2**40, 2**40], b"", "BYTES"),
        _typed([2**62, 0], []),
    ],
    ids=["raw", "bytes", "typed"],
)
def test_a_zero_size_shape_too_large_for_any_array_is_invalid_input(request_):
    with pytest.raises(InvalidInputError, match=r"input 'X': shape \[.*\] is larger than any"):
        infer_request_from_pb(request_, None)


def test_a_zero_size_shape_within_the_limit_still_decodes():
    request = infer_request_from_pb(_raw([2**31, 0], b""), None)
    assert request.inputs[0].data.shape == (2**31, 0)
