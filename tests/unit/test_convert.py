"""The general path's wire-format checks (infer_request_from_pb): malformed requests are the
caller's error, with a message naming the input, never an internal error."""

from __future__ import annotations

import time

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


def _with_timeout(**param: int | str) -> pb.ModelInferRequest:
    request = _raw([1, 1], b"\x00" * 4)
    (kind, value), *_ = param.items()
    setattr(request.parameters["timeout"], kind, value)
    return request


def test_the_timeout_parameter_gives_the_request_its_own_deadline_that_the_server_keeps():
    """Triton's ``timeout`` (µs): gRPC would not end the call then, so the request is timed."""
    before = time.monotonic()
    decoded = infer_request_from_pb(_with_timeout(int64_param=250_000), None)
    assert decoded.deadline is not None and decoded.timed
    assert before + 0.25 <= decoded.deadline <= time.monotonic() + 0.25
    # a later gRPC deadline does not lengthen it; tritonclient sends int64, uint64 is taken too
    decoded = infer_request_from_pb(_with_timeout(uint64_param=250_000), 60.0)
    assert decoded.deadline is not None and decoded.timed
    assert decoded.deadline <= time.monotonic() + 0.25


def test_an_earlier_grpc_deadline_holds_over_the_timeout_parameter_and_zero_is_none():
    before = time.monotonic()
    decoded = infer_request_from_pb(_with_timeout(int64_param=5_000_000), 0.5)
    assert decoded.deadline is not None and not decoded.timed  # (gRPC ends the call itself)
    assert before + 0.5 <= decoded.deadline <= time.monotonic() + 0.5
    decoded = infer_request_from_pb(_with_timeout(int64_param=0), None)
    assert decoded.deadline is None and not decoded.timed
    assert infer_request_from_pb(_raw([1, 1], b"\x00" * 4), None).deadline is None


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ({"int64_param": -1}, r"parameter 'timeout' is -1: give the request's timeout in micro"),
        ({"string_param": "5s"}, r"'timeout' must be a whole number .*, got string_param"),
        ({"double_param": 0.5}, r"'timeout' must be a whole number .*, got double_param"),
    ],
)
def test_a_timeout_parameter_that_is_no_whole_number_of_microseconds_is_invalid_input(
    param, message
):
    with pytest.raises(InvalidInputError, match=message):
        infer_request_from_pb(_with_timeout(**param), None)
