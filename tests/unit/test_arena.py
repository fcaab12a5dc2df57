import os

import numpy as np

from serve.pool.arena import Arena, create_memfd
from serve.protocol.datatypes import Datatype


def _arena(slots: int = 2, slot_bytes: int = 4096) -> Arena:
    fd = create_memfd("test", slots * slot_bytes)
    try:
        return Arena(fd, slots, slot_bytes)
    finally:
        os.close(fd)


def test_tensors_round_trip_through_a_slot_without_touching_the_other():
    arena = _arena()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([[True, False]])
    s = np.array([[b"x", b"yz"]], dtype=object)
    refs = arena.write(
        1, [("A", Datatype.FP32, [a]), ("B", Datatype.BOOL, [b]), ("S", Datatype.BYTES, [s])]
    )
    other = arena.write(0, [("A", Datatype.FP32, [np.zeros((3, 4), np.float32)])])
    assert all(r.inline is None for r in refs)
    assert all(r.offset % 64 == 0 for r in refs)
    np.testing.assert_array_equal(arena.read(1, refs[0], copy=True), a)
    np.testing.assert_array_equal(arena.read(1, refs[1], copy=True), b)
    assert arena.read(1, refs[2], copy=True).tolist() == [[b"x", b"yz"]]
    assert not arena.read(0, other[0], copy=True).any()


def test_a_tensor_larger_than_its_slot_travels_inline():
    arena = _arena(slots=1, slot_bytes=1024)
    big = np.ones((1, 1000), dtype=np.float32)
    (ref,) = arena.write(0, [("BIG", Datatype.FP32, [big])])
    assert ref.offset == -1 and ref.inline is not None
    np.testing.assert_array_equal(arena.read(0, ref, copy=True), big)


def test_a_copy_survives_the_slot_being_reused():
    arena = _arena(slots=1)
    (ref,) = arena.write(0, [("A", Datatype.INT64, [np.array([[1, 2]])])])
    kept = arena.read(0, ref, copy=True)
    arena.write(0, [("A", Datatype.INT64, [np.array([[7, 7]])])])
    assert kept.tolist() == [[1, 2]]


def test_the_parts_of_a_batch_are_concatenated_as_they_are_copied():
    arena = _arena()
    parts = [np.full((n, 3), n, dtype=np.float32) for n in (1, 2, 3)]
    words = [np.array([[b"a"]], dtype=object), np.array([[b"bc"], [b""]], dtype=object)]
    refs = arena.write(0, [("A", Datatype.FP32, parts), ("S", Datatype.BYTES, words)])
    assert refs[0].shape == (6, 3) and refs[1].shape == (3, 1)
    np.testing.assert_array_equal(arena.read(0, refs[0], copy=True), np.concatenate(parts))
    assert arena.read(0, refs[1], copy=True).tolist() == [[b"a"], [b"bc"], [b""]]


def test_parts_too_large_for_the_slot_travel_inline_concatenated():
    arena = _arena(slots=1, slot_bytes=1024)
    parts = [np.full((1, 200), i, dtype=np.float32) for i in range(2)]
    (ref,) = arena.write(0, [("BIG", Datatype.FP32, parts)])
    assert ref.offset == -1
    np.testing.assert_array_equal(arena.read(0, ref, copy=True), np.concatenate(parts))


def test_an_empty_tensor_round_trips():
    # (a detector that finds nothing answers a zero-length variable dimension)
    arena = _arena()
    empty = np.zeros((2, 0), dtype=np.float32)
    parts = [np.zeros((1, 0, 4), np.int64), np.zeros((2, 0, 4), np.int64)]
    refs = arena.write(0, [("E", Datatype.FP32, [empty]), ("P", Datatype.INT64, parts)])
    assert arena.read(0, refs[0], copy=True).shape == (2, 0)
    assert arena.read(0, refs[1], copy=False).shape == (3, 0, 4)
