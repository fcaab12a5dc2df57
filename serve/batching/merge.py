"""Pure functions that merge requests into one batch and split a batch's outputs back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
Signature = tuple[tuple[int, ...], ...]


def signature(inputs: Sequence[Array]) -> Signature:
    """What must be equal for two requests to share a batch: every input's non-batch shape."""
    if len(inputs) == 1:  # the common case, on the request path
        return (inputs[0].shape[1:],)
    return tuple(tuple(a.shape[1:]) for a in inputs)


def merge(requests: Sequence[Sequence[Array]]) -> list[Array]:
    """Concatenate each input along the batch axis. All requests must share one signature."""
    if len(requests) == 1:
        return list(requests[0])
    return [np.concatenate(column, axis=0) for column in zip(*requests, strict=True)]


def split(outputs: Sequence[Array], row_counts: Sequence[int]) -> list[list[Array]]:
    """Give each request its own rows of every output, in request order.

    Raises ValueError when an output's leading dimension is not the batch's total row count.
    """
    total = sum(row_counts)
    for index, out in enumerate(outputs):
        if out.ndim == 0 or out.shape[0] != total:
            got = "a scalar" if out.ndim == 0 else f"{out.shape[0]} rows"
            raise ValueError(f"output #{index} has {got}, expected {total} (one per batch row)")
    if len(row_counts) == 1:
        return [list(outputs)]
    result: list[list[Array]] = []
    start = 0
    for count in row_counts:
        result.append([out[start : start + count] for out in outputs])
        start += count
    return result
