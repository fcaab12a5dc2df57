"""Deterministic sample tensors for a signature: worker warm-up and default probe requests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from serve.protocol.datatypes import Datatype, numpy_dtype


def sample_arrays(
    specs: Sequence[tuple[str, str, tuple[int, ...]]], rows: int | None, seed: int = 0
) -> dict[str, npt.NDArray[Any]]:
    """One array per (name, datatype, shape); variable dims become 1; ``rows`` prepends a batch.

    Integer tensors are zeros: they are often token ids or indices into a table whose size the
    config does not say, and 0 is the one value in range for every such table (a random id past
    the end would fail warm-up, or on CUDA trip a device-side assert that ends the worker)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name, datatype_name, dims in specs:
        shape = tuple(d if d > 0 else 1 for d in dims)
        if rows is not None:
            shape = (rows, *shape)
        datatype = Datatype(datatype_name)
        if datatype is Datatype.BYTES:
            arrays[name] = np.full(shape, b"warmserve", dtype=np.object_)
        elif datatype is Datatype.BOOL:
            arrays[name] = rng.random(shape) < 0.5
        elif datatype in (Datatype.FP16, Datatype.FP32, Datatype.FP64):
            arrays[name] = rng.standard_normal(shape).astype(numpy_dtype(datatype))
        else:
            arrays[name] = np.zeros(shape, dtype=numpy_dtype(datatype))
    return arrays
