"""Typed contents as arrays (serve/frontend/typed.py) are exactly what protobuf's own accessor
gives, for every number field and the datatypes that use it, at sizes on both sides of the plain
path, with the fields' extreme values; a value the datatype cannot hold is refused; floats,
doubles, bools and UINT8 past the plain path are read from their packed run, not value by value."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from serve.frontend.convert import CONTENTS_FIELD
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.typed import PLAIN_BELOW, typed_array
from serve.protocol.datatypes import Datatype, numpy_dtype

# per field: the values it can carry (its proto type's range)
FIELD_RANGE = {
    "int_contents": (-(2**31), 2**31 - 1),
    "int64_contents": (-(2**63), 2**63 - 1),
    "uint_contents": (0, 2**32 - 1),
    "uint64_contents": (0, 2**64 - 1),
}
NUMBER_TYPES = [d for d in CONTENTS_FIELD if d is not Datatype.BYTES]


def _contents(field: str, values: list[Any]) -> Any:
    """The InferTensorContents a request would carry, as the serving process parses it."""
    message = pb.InferTensorContents()
    getattr(message, field).extend(values)
    return pb.InferTensorContents.FromString(message.SerializeToString())


def _values(datatype: Datatype, count: int, rng: np.random.Generator) -> list[Any]:
    """``count`` values that ``datatype`` holds, its extremes among them."""
    field = CONTENTS_FIELD[datatype]
    if field == "bool_contents":
        return [bool(v) for v in rng.integers(0, 2, count)]
    dtype = numpy_dtype(datatype)
    if field in ("fp32_contents", "fp64_contents"):
        info = np.finfo(dtype)
        extremes = [float(info.max), float(info.min), float(info.tiny), -0.0, float("inf")]
        drawn = rng.standard_normal(count).astype(dtype) * 1e3
        return [*extremes, float("nan"), *map(float, drawn)][:count]
    bounds = np.iinfo(dtype)
    extremes = [int(bounds.min), int(bounds.max), 0, 1, -1, 127, 128, 2**31, -(2**31)]
    extremes = [v for v in extremes if bounds.min <= v <= bounds.max]
    if dtype == np.uint64:  # past int64's range
        drawn = rng.integers(0, 2**64 - 1, count, dtype=np.uint64, endpoint=True)
    else:
        drawn = rng.integers(int(bounds.min), int(bounds.max), count, dtype=np.int64, endpoint=True)
    return [*extremes, *map(int, drawn)][:count]


@pytest.mark.parametrize("count", [1, PLAIN_BELOW - 1, PLAIN_BELOW, 5000])
@pytest.mark.parametrize("datatype", NUMBER_TYPES, ids=lambda d: d.value)
def test_the_packed_run_reads_as_protobufs_accessor_does(datatype: Datatype, count: int) -> None:
    rng = np.random.default_rng(count)
    field = CONTENTS_FIELD[datatype]
    contents = _contents(field, _values(datatype, count, rng))
    dtype = numpy_dtype(datatype)
    expected = np.asarray(getattr(contents, field), dtype=dtype)
    got = typed_array(contents, field, dtype, count)
    assert got.dtype == dtype and got.shape == (count,)
    np.testing.assert_array_equal(got, expected)  # (NaN equals NaN here)
    if dtype.kind == "f":  # bit for bit: signed zeros and NaNs too
        assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("count", [3, 5000])
@pytest.mark.parametrize(
    ("datatype", "outside"),
    [
        (Datatype.INT8, 128),
        (Datatype.INT8, -129),
        (Datatype.INT16, 2**15),
        (Datatype.UINT8, 256),
        (Datatype.UINT16, 2**16),
    ],
    ids=lambda v: getattr(v, "value", str(v)),
)
def test_a_value_the_datatype_cannot_hold_is_refused(
    datatype: Datatype, outside: int, count: int
) -> None:
    field = CONTENTS_FIELD[datatype]
    values = [1] * count
    values[count // 2] = outside
    contents = _contents(field, values)
    with pytest.raises(OverflowError):
        typed_array(contents, field, numpy_dtype(datatype), count)


def test_only_the_field_asked_for_is_read_when_several_are_set() -> None:
    message = pb.InferTensorContents()
    message.int_contents.extend([7] * 3000)
    message.fp32_contents.extend([0.5] * 3000)
    message.bytes_contents.extend([b"x"] * 3)
    contents = pb.InferTensorContents.FromString(message.SerializeToString())
    ints = typed_array(contents, "int_contents", np.dtype(np.int32), 3000)
    floats = typed_array(contents, "fp32_contents", np.dtype(np.float32), 3000)
    assert ints.tolist() == [7] * 3000 and floats.tolist() == [0.5] * 3000


class _AccessorForbidden:
    """Contents whose repeated fields must not be read one value at a time."""

    def __init__(self, contents: Any) -> None:
        self._wire = contents.SerializeToString()

    def SerializeToString(self) -> bytes:  # (protobuf's name)
        return self._wire

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} read through protobuf's accessor")


@pytest.mark.parametrize(
    "datatype", [Datatype.FP32, Datatype.FP64, Datatype.BOOL, Datatype.UINT8], ids=lambda d: d.value
)
def test_floats_doubles_bools_and_uint8_past_the_plain_path_are_read_from_their_run(datatype):
    rng = np.random.default_rng(5)
    field = CONTENTS_FIELD[datatype]
    contents = _contents(field, _values(datatype, 1000, rng))
    expected = np.asarray(getattr(contents, field), dtype=numpy_dtype(datatype))
    got = typed_array(_AccessorForbidden(contents), field, numpy_dtype(datatype), 1000)
    np.testing.assert_array_equal(got, expected)
