"""Shared-memory arenas: one anonymous memory file per direction per worker, cut into slots.

Each in-flight batch owns one slot in each direction. A tensor is written at an aligned offset of
its slot; one that does not fit travels inline in the message instead. The memory file has no name
in the file system: it is handed to the worker as an inherited descriptor and vanishes when both
processes close it, so a crash leaves nothing behind.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from serve.pool.messages import TensorRef
from serve.protocol.datatypes import (
    Datatype,
    bytes_tensor_from_raw,
    bytes_tensor_to_raw,
    numpy_dtype,
)

ALIGN = 64


def create_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, 0)  # inheritable by a child given it in pass_fds
    os.ftruncate(fd, size)
    return fd


class Arena:
    """A mapped memory file of ``slots * slot_bytes`` bytes."""

    def __init__(self, fd: int, slots: int, slot_bytes: int) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.size = slots * slot_bytes
        self._map = mmap.mmap(fd, self.size)
        self._buffer = memoryview(self._map)
        self._whole: npt.NDArray[np.uint8] | None = None  # a view for the address, once asked

    def address_range(self) -> tuple[int, int]:
        """(address, size) of the mapping in this process, e.g. to page-lock it for a GPU."""
        if self._whole is None:
            self._whole = np.frombuffer(self._buffer, dtype=np.uint8)
        return self._whole.ctypes.data, self.size

    def close(self) -> None:
        """Unmap now if no array still views the arena; otherwise the last view's release does."""
        self._whole = None
        try:
            self._buffer.release()
            self._map.close()
        except BufferError:
            pass

    def write(
        self, slot: int, tensors: Sequence[tuple[str, Datatype, Sequence[npt.NDArray[Any]]]]
    ) -> list[TensorRef]:
        """Place tensors in ``slot``; any that does not fit goes inline. Each tensor is given as
        parts (one per request of a batch) that are concatenated along the first axis as they are
        copied, so a batch is copied once, not merged first and copied again."""
        base = slot * self.slot_bytes
        offset = 0
        refs: list[TensorRef] = []
        for name, datatype, parts in tensors:
            first = parts[0]
            if len(parts) == 1 and datatype is not Datatype.BYTES and first.flags.c_contiguous:
                # the common case: one contiguous array, copied as bytes
                nbytes = first.nbytes
                if offset + nbytes <= self.slot_bytes:
                    start = base + offset
                    if nbytes:  # (an empty array's memoryview cannot be cast)
                        self._buffer[start : start + nbytes] = first.data.cast("B")
                    refs.append(TensorRef(name, datatype.value, first.shape, offset, nbytes))
                    offset = (offset + nbytes + ALIGN - 1) // ALIGN * ALIGN
                    continue
            if len(parts) == 1:
                shape = first.shape
            else:
                shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
            if datatype is Datatype.BYTES:
                whole = first if len(parts) == 1 else np.concatenate(parts, axis=0)
                encoded = bytes_tensor_to_raw(whole)
                raw: bytes | None = encoded
                nbytes = len(encoded)
            else:
                raw = None
                nbytes = first.dtype.itemsize * math.prod(shape)
            if offset + nbytes > self.slot_bytes:
                if raw is None:
                    whole = first if len(parts) == 1 else np.concatenate(parts, axis=0)
                    raw = np.ascontiguousarray(whole).tobytes()
                refs.append(TensorRef(name, datatype.value, shape, -1, nbytes, raw))
                continue
            start = base + offset
            if raw is not None:
                self._buffer[start : start + nbytes] = raw
            elif len(parts) == 1:
                target = np.ndarray(shape, dtype=first.dtype, buffer=self._buffer, offset=start)
                np.copyto(target, first, casting="no")
            else:
                target = np.ndarray(shape, dtype=first.dtype, buffer=self._buffer, offset=start)
                np.concatenate(parts, axis=0, out=target, casting="no")
            refs.append(TensorRef(name, datatype.value, shape, offset, nbytes))
            offset = (offset + nbytes + ALIGN - 1) // ALIGN * ALIGN
        return refs

    def read(self, slot: int, ref: TensorRef, *, copy: bool) -> npt.NDArray[Any]:
        """The tensor ``ref`` names; a view into shared memory unless ``copy`` (or inline)."""
        dtype = _DTYPES.get(ref.datatype)
        if ref.inline is not None:
            source: Any = ref.inline
            start = 0
        else:
            source = self._buffer
            start = slot * self.slot_bytes + ref.offset
        if dtype is None:
            if ref.datatype != Datatype.BYTES.value:
                raise ValueError(f"tensor {ref.name!r} has unknown datatype {ref.datatype!r}")
            count = math.prod(ref.shape)
            flat = bytes_tensor_from_raw(memoryview(source)[start : start + ref.nbytes], count)
            return flat.reshape(ref.shape)
        array: npt.NDArray[Any] = np.ndarray(ref.shape, dtype=dtype, buffer=source, offset=start)
        return array.copy() if copy and ref.inline is None else array


# datatype name → numpy dtype of every fixed-size datatype (BYTES is absent)
_DTYPES = {d.value: numpy_dtype(d) for d in Datatype if d is not Datatype.BYTES}
