"""The server-wide budget of inference bytes held in flight: requests and their unsent answers.

Every inference request is counted from the moment it is decoded until its answer is sent or it
fails (an error, its caller cancelling, its deadline): what it holds in memory, estimated from
its decoded inputs (``held_bytes``). A request that would take the total over the budget is
refused at once (RESOURCE_EXHAUSTED), never queued, so a burst of large requests cannot take
the process past its memory limit and every caller with it; requests already admitted are not
touched. Decoding runs one request at a time on the event loop, so at most one request is held
uncounted, and only until it is refused. Everything runs on the event-loop thread: no lock.

An answer is counted too (``answer_bytes``), from the handler's return until gRPC has sent it
(``release_once_sent``): gRPC keeps an answer the client does not read (HTTP/2 flow control:
a stuck or hostile client that opens calls and never reads) in memory, and without this a few
such clients took the process to gigabytes. An answer is never refused, since its work is done;
while unsent answers hold the budget, new requests are refused instead. A relay process holds
its callers' answers the same way, against its share of the budget (relay.py); the requests it
passes on are counted here.

The one gate is InferenceServicer.ModelInfer, which every inference request passes through once:
direct calls, each request of a ModelStreamInfer stream, and calls relayed from relay processes
(the hub dispatches them to the same servicer methods). A stream's answers wait on its own
writes (at most its in-flight limit of them), a relayed call's in its relay.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from serve.config import ModelConfig
from serve.errors import InflightLimitError
from serve.protocol.datatypes import Datatype, numpy_dtype

log = logging.getLogger(__name__)

# A BYTES element once decoded: a Python bytes object of its own (a 33-byte header besides its
# payload) and the object array's 8-byte pointer to it.
BYTES_ELEMENT_OVERHEAD = 33 + 8
# A BYTES element in the message: its 4-byte length prefix in raw contents, upb's 16-byte string
# view in typed contents.
RAW_STRING_OVERHEAD = 4
TYPED_STRING_OVERHEAD = 16
# An answer not sent yet is held three times: the response message, its serialised bytes (both
# kept by grpc.aio's handler until the send completes) and gRPC core's copy of them. Measured:
# 71 unread 4 MB answers grew the serving process by 930 MB. A relay's, twice (the reply's bytes
# and gRPC core's copy).
ANSWER_COPIES = 3
RELAYED_ANSWER_COPIES = 2


class Source(enum.Enum):
    """Where a request's decoded inputs came from, which decides what else it holds."""

    RAW = "raw"  # raw_input_contents: the message holds their bytes as well
    RING = "ring"  # a relay's ring: shared memory, held whether or not a request is there
    TYPED = "typed"  # typed contents: the message holds its repeated fields as well


def held_bytes(inputs: Sequence[npt.NDArray[Any]], source: Source) -> int:
    """About how many bytes a request whose decoded inputs are ``inputs`` holds from its
    decoding to its answer, its inputs' data only (the rest is small beside them): the arrays,
    plus the message's own copy of their contents:

    - raw contents: twice their size (the arrays view a copy of the message's bytes: reading
      an element of a repeated bytes field copies it out); from a relay's ring, once.
    - BYTES: the payload twice (message, decoded objects), plus BYTES_ELEMENT_OVERHEAD per
      element decoded and the message's per-element overhead.
    - typed contents: the array, plus the message's repeated field (4 or 8 bytes an element,
      1 for BOOL).
    """
    total = 0
    for array in inputs:
        count = array.size
        if array.dtype.hasobject:  # BYTES
            payload = sum(map(len, array.flat))
            total += payload + count * BYTES_ELEMENT_OVERHEAD
            if source is Source.RAW:
                total += payload + count * RAW_STRING_OVERHEAD
            elif source is Source.TYPED:
                total += payload + count * TYPED_STRING_OVERHEAD
            continue
        nbytes = array.nbytes
        if source is Source.RAW:
            total += 2 * nbytes
        elif source is Source.RING:
            total += nbytes
        else:
            itemsize = array.dtype.itemsize
            total += nbytes + count * (1 if array.dtype == np.bool_ else max(4, itemsize))
    return total


def answer_bytes(outputs: Sequence[npt.NDArray[Any]]) -> int:
    """About how many bytes an answer holds until it is sent: ANSWER_COPIES of its outputs'
    data as serialised (a BYTES element: its payload and its 4-byte length prefix)."""
    total = 0
    for array in outputs:
        if array.dtype.hasobject:
            total += sum(map(len, array.flat)) + array.size * RAW_STRING_OVERHEAD
        else:
            total += array.nbytes
    return ANSWER_COPIES * total


def expected_answer_bytes(model: ModelConfig) -> int:
    """What one row's answer (the whole answer, for a model without a batch axis) will hold
    until it is sent, when the model config fixes every output's shape and element size: a
    request reserves it when admitted, so a burst of requests whose answers nobody reads cannot
    pass the budget once answered. 0 when an output varies (a variable dimension, BYTES): the
    reservation for such answers is learned from the answers made (PlainCodec.learn_answer)."""
    total = 0
    for spec in model.outputs:
        datatype = Datatype(spec.datatype)
        if datatype is Datatype.BYTES or any(d < 0 for d in spec.shape):
            return 0
        total += math.prod(spec.shape) * numpy_dtype(datatype).itemsize
    return ANSWER_COPIES * total


class InflightBudget:
    """Request bytes and unsent answer bytes held in flight, server-wide, and their limit."""

    __slots__ = ("_refusing", "held", "limit", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0  # requests refused since start
        self._refusing = False  # refusing since the last request admitted (for the log)

    def admit(self, size: int) -> int:
        """Hold ``size`` bytes for a request (``release`` them when it ends): ``size``.
        InflightLimitError, holding nothing, when they would take the total over the limit."""
        held, limit = self.held, self.limit
        if held + size <= limit:
            self.held = held + size
            if self._refusing:
                self._refusing = False
                log.info(
                    "in-flight request budget: admitting requests again (%d of %d bytes held)",
                    self.held,
                    limit,
                )
            return size
        self.refused += 1
        if size > limit:
            raise InflightLimitError(
                f"the request needs about {size} bytes in memory once decoded, more than the "
                f"server's whole budget for requests in flight ({limit} bytes, "
                "max_inflight_bytes): it can never be admitted; send its data in smaller requests"
            )
        if not self._refusing:
            self._refusing = True
            log.warning(
                "in-flight request budget full: %d of %d bytes of requests held; refusing "
                "requests (RESOURCE_EXHAUSTED) until some finish",
                held,
                limit,
            )
        raise InflightLimitError(
            f"the server holds {held} bytes of requests and unsent answers in flight (limit "
            f"{limit}, max_inflight_bytes) and this request needs about {size} more: retry "
            "later, or add replicas"
        )

    def release(self, size: int, _call: object = None) -> None:
        """Give ``size`` bytes back (also as a gRPC done callback, which passes the call)."""
        self.held -= size

    def hold(self, size: int) -> int:
        """Hold ``size`` bytes that cannot be refused any more (an answer computed for a caller
        that has not read it yet): the total may pass the limit, and requests are refused until
        it is back under. ``size``, to release when the answer has been sent."""
        self.held += size
        return size

    def check_room(self) -> None:
        """For a relay, whose budget holds only the answers its callers have not read yet:
        InflightLimitError while they hold all of it."""
        held, limit = self.held, self.limit
        if held < limit:
            if self._refusing:
                self._refusing = False
                log.info("unsent answers: taking requests again (%d of %d bytes)", held, limit)
            return
        self.refused += 1
        if not self._refusing:
            self._refusing = True
            log.warning(
                "%d bytes of answers that callers do not read are held here (limit %d); "
                "refusing requests (RESOURCE_EXHAUSTED) until they are sent or dropped",
                held,
                limit,
            )
        raise InflightLimitError(
            f"this relay holds {held} bytes of unsent answers, which their callers do not read "
            f"(limit {limit}, its share of max_inflight_bytes): retry later, or add replicas"
        )


def release_once_sent(budget: InflightBudget, size: int) -> None:
    """Give ``size`` bytes of ``budget`` back once gRPC has sent the answer of the call whose
    handler runs now, or has dropped the call. grpc.aio runs each call's handler in a task of
    its own and ends that task after sending the answer (and after running the call's own done
    callbacks): the task's done callback is the moment. Not ``context.add_done_callback``:
    grpc.aio keeps a call's done callbacks, bound to its context, in the call's state after
    they ran, so every call that registers one is a reference cycle that only the garbage
    collector frees, with the call's state, in batches of dozens of calls (11 objects left
    to the collector per call instead of grpc.aio's own 5)."""
    task = asyncio.current_task()
    if task is None:  # (not in a task: nothing will tell when it is sent)
        raise RuntimeError("release_once_sent outside a call's handler task")
    task.add_done_callback(functools.partial(budget.release, size))
