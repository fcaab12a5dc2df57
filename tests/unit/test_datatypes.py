import numpy as np
import pytest

from serve.protocol.datatypes import (
    Datatype,
    bytes_tensor_from_raw,
    bytes_tensor_to_raw,
    datatype_of,
    element_size,
    numpy_dtype,
    parse_datatype,
)


def test_bytes_round_trip_keeps_every_element_and_shape():
    items = np.array([[b"", b"a"], [b"\x00\xff", "text"]], dtype=object)
    raw = bytes_tensor_to_raw(items)
    back = bytes_tensor_from_raw(raw, 4).reshape(2, 2)
    assert back.tolist() == [[b"", b"a"], [b"\x00\xff", b"text"]]
    assert raw[:4] == (0).to_bytes(4, "little")


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x05\x00\x00\x00abc", 1, "claims 5 bytes"),
        (b"\x02\x00\x00\x00abcd", 2, "ends after 1 of 2"),
        (b"\x01\x00\x00\x00ab", 1, "1 bytes left over"),
    ],
)
def test_malformed_bytes_are_rejected_with_a_reason(raw, count, message):
    with pytest.raises(ValueError, match=message):
        bytes_tensor_from_raw(raw, count)


def test_a_shape_the_data_cannot_hold_is_refused_before_anything_is_allocated():
    # 2**40 elements would need 8 TiB of object pointers: refused from the data's size first
    with pytest.raises(ValueError, match="8 bytes cannot hold 1099511627776 elements"):
        bytes_tensor_from_raw(b"\x00" * 8, 2**40)


@pytest.mark.parametrize("datatype", list(Datatype))
def test_every_datatype_maps_to_numpy_and_back(datatype):
    dtype = numpy_dtype(datatype)
    array = np.zeros(3, dtype=dtype)
    assert datatype_of(array) is datatype
    assert element_size(datatype) == (0 if datatype is Datatype.BYTES else dtype.itemsize)


def test_unknown_datatype_names_the_valid_ones():
    with pytest.raises(ValueError, match="expected one of BOOL"):
        parse_datatype("FLOAT32")
    assert parse_datatype("FP16") is Datatype.FP16
