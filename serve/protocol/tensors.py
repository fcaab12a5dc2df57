"""Transport-neutral request, response and tensor types used from the front end to the pool."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from serve.protocol.datatypes import Datatype

Parameters = dict[str, bool | int | str | float]


@dataclass(slots=True)
class Tensor:
    """A named tensor. ``data`` has exactly ``shape``; BYTES tensors are object arrays of bytes."""

    name: str
    datatype: Datatype
    data: npt.NDArray[Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)


@dataclass(slots=True)
class InferRequest:
    model_name: str
    inputs: list[Tensor]
    model_version: str = ""
    id: str = ""
    outputs: list[str] | None = None  # names the caller asked for; None means all
    parameters: Parameters = field(default_factory=dict)
    deadline: float | None = None  # time.monotonic() seconds; None means no deadline
    # False when the transport already ends the call at its deadline (gRPC cancels the handler):
    # the deadline then only keeps an expired request from being computed, with no timer of ours.
    timed: bool = True


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
