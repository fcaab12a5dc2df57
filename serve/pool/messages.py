"""Typed, versioned messages between the parent and a worker process.

Frames on the socket are a 4-byte little-endian length then a msgpack-encoded message. Tensors
do not travel in messages: a TensorRef points into the shared-memory arena, and only a tensor that
does not fit its slot travels inline as raw bytes (never as a pickle). Exceptions never cross the
boundary: a worker reports a kind and a message.
"""

from __future__ import annotations

import struct

import msgspec

from serve.config import ModelConfig

IPC_VERSION = 1
FRAME_HEADER = struct.Struct("<I")
FORK_PID = struct.Struct("<q")  # the worker template's answer to a fork request
FORK_REQUEST_BYTES = 64  # a fork request: the log level, with three descriptors attached
MAX_FRAME_BYTES = 1 << 31


class TensorRef(msgspec.Struct, frozen=True, array_like=True):
    name: str
    datatype: str
    shape: tuple[int, ...]
    offset: int  # into this batch's slot; -1 when the data is inline
    nbytes: int
    inline: bytes | None = None


# parent → worker


class Init(msgspec.Struct, frozen=True, tag=True):
    version: int
    model: ModelConfig
    worker_id: str
    device: str
    threads: int
    slots: int
    slot_bytes: int
    fixed_shapes: bool | None
    bundle_id: str = ""  # verify the model's directory against this id before loading
    require_gpu: bool = False  # device "auto" must resolve to CUDA (WARMSERVE_REQUIRE_GPU)
    server_pid: int = 0  # the serving process: the worker exits when it is gone (0: not watched)


class RunBatch(msgspec.Struct, frozen=True, tag=True):
    batch_id: int
    slot: int
    rows: int
    inputs: list[TensorRef]


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    reason: str = ""


# worker → parent


class Ready(msgspec.Struct, frozen=True, tag=True):
    version: int
    pid: int
    device: str
    backend: str
    buckets: tuple[int, ...]
    fixed_shapes: bool
    warmup_s: float
    load_s: float


class BatchDone(msgspec.Struct, frozen=True, tag=True):
    batch_id: int
    outputs: list[TensorRef]
    input_ns: int  # reading inputs from shared memory (and to the device)
    compute_ns: int  # the model itself
    output_ns: int  # writing outputs back


class BatchFailed(msgspec.Struct, frozen=True, tag=True):
    batch_id: int
    kind: str  # "invalid_input" | "execution" | "out_of_memory"
    message: str


class Fatal(msgspec.Struct, frozen=True, tag=True):
    message: str
    batch_id: int = -1  # the batch that caused it, if one did: that batch is not retried
    # a start-up failure of the model itself (its load or warm-up), not of the host
    model_fault: bool = False


ToWorker = Init | RunBatch | Shutdown
FromWorker = Ready | BatchDone | BatchFailed | Fatal

_encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
from_worker_decoder = msgspec.msgpack.Decoder(FromWorker)


def frame(message: ToWorker | FromWorker) -> bytes:
    payload = _encoder.encode(message)
    return FRAME_HEADER.pack(len(payload)) + payload
