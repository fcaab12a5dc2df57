"""The wire between a gRPC relay process and the serving process's hub (``frontends > 1``).

A 4-byte little-endian length, then a msgpack message. The relay's first message is a Hello
with the relay protocol version; then RelayCall (a call: method name and serialised request) and
RelayCancel (its caller went away) go to the hub. The hub pings each relay once a second and
the relay answers from its event loop (a relay that stops answering is killed and restarted:
serve/supervisor.py). A RelayReply ends a call: the response of a
unary call, or the status of a server-streaming one (Health/Watch), whose messages come before
it as RelayStream. Both ends
are asyncio protocols: a read that brings several frames decodes them in one go, and frames
written in one turn of the event loop leave in one system call.

This module imports neither the servicer nor the runtime: a relay process needs only this.
"""

from __future__ import annotations

import asyncio
import mmap
import struct
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import grpc
import msgspec
from grpc_health.v1 import health_pb2

RELAY_VERSION = 4
FRAME = struct.Struct("<I")
FRAME_MARGIN = 1024 * 1024  # a frame is at most a gRPC message (max_message_bytes) + this
INFER_SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{INFER_SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{INFER_SERVICE}/ModelStreamInfer"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
OK = grpc.StatusCode.OK.value[0]
WRITE_HIGH_WATER = 64 * 1024 * 1024  # bytes queued for the peer before writers wait
RING_MIN_BYTES = 16 * 1024  # smaller requests are cheaper inline


class Hello(msgspec.Struct, frozen=True, tag=True, array_like=True):
    version: int
    relay: int  # the relay's index, for per-relay counts


class RelayCall(msgspec.Struct, frozen=True, tag=True, array_like=True):
    id: int
    method: str  # "/package.Service/Method"
    timeout_s: float | None  # what was left of the caller's deadline when the relay got it
    payload: bytes
    # A ModelInfer whose raw_input_contents the relay wrote into its ring (RelayRing): each
    # one's (offset, bytes) there, in order; the payload is the request without them. The ring
    # space stays the call's until the relay gets the call's RelayReply, which the hub sends
    # for such a call even when it is cancelled.
    ring: list[tuple[int, int]] | None = None


class RelayCancel(msgspec.Struct, frozen=True, tag=True, array_like=True):
    id: int  # a RelayCall's id; its caller has gone


class Ping(msgspec.Struct, frozen=True, tag=True, array_like=True):
    seq: int  # the hub asks whether the relay's event loop still runs


class Pong(msgspec.Struct, frozen=True, tag=True, array_like=True):
    seq: int  # the relay's answer to the Ping of that number


class RelayReply(msgspec.Struct, frozen=True, tag=True, array_like=True):
    id: int
    code: int  # grpc.StatusCode value; 0 is OK
    details: str
    payload: bytes


class RelayStream(msgspec.Struct, frozen=True, tag=True, array_like=True):
    id: int  # a streaming RelayCall's id
    payload: bytes  # one serialised response message


class RelayRing:
    """A relay's shared memory for the tensors of the calls it passes on. The serving process
    creates the memory file when it starts the relay and maps it too, so a large request's
    tensor bytes go from the relay to the worker's arena with one copy in the serving process,
    instead of through the socket, the frame, msgspec and protobuf (about six copies: on the
    dev VM a 150 KB request cost the serving thread about 130 µs more than a small one).

    The relay side hands out fixed slots, most recently freed first, so only as many slots as
    there are calls in flight are ever touched."""

    def __init__(self, fd: int, slots: int, slot_bytes: int) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._map = mmap.mmap(fd, slots * slot_bytes)
        self.view = memoryview(self._map)
        self._free = list(range(slots - 1, -1, -1))  # a stack: slot 0 is used first

    def put(self, parts: Sequence[bytes]) -> tuple[int, list[tuple[int, int]]] | None:
        """Copy ``parts`` into a free slot: (the slot, each part's (offset, bytes)); None if
        they do not fit in one slot or every slot is taken (the call then goes inline)."""
        if not self._free or sum(len(p) for p in parts) > self.slot_bytes:
            return None
        slot = self._free.pop()
        offset = slot * self.slot_bytes
        places = []
        for part in parts:
            size = len(part)
            self.view[offset : offset + size] = part
            places.append((offset, size))
            offset += size
        return slot, places

    def release(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def free(self) -> int:
        return len(self._free)

    def parts(self, places: Sequence[tuple[int, int]]) -> list[memoryview]:
        """The serving process's views of a call's parts. Raises ValueError for a place outside
        the ring."""
        size = len(self.view)
        for offset, length in places:
            if offset < 0 or length < 0 or offset + length > size:
                raise ValueError(f"ring place ({offset}, {length}) is outside the {size}-byte ring")
        return [self.view[offset : offset + length] for offset, length in places]


ToHub = Hello | RelayCall | RelayCancel | Pong
FromHub = RelayReply | RelayStream | Ping
to_hub_decoder = msgspec.msgpack.Decoder(ToHub)
from_hub_decoder = msgspec.msgpack.Decoder(FromHub)
_encoder = msgspec.msgpack.Encoder()

M = TypeVar("M")


def frame(message: msgspec.Struct) -> bytes:
    body = _encoder.encode(message)
    return FRAME.pack(len(body)) + body


class FrameDecoder(Generic[M]):
    """Cuts a byte stream into frames and decodes each. Raises ValueError for a frame over
    ``max_frame`` bytes and msgspec.DecodeError for one that is not a message: the connection
    is then beyond repair."""

    def __init__(self, decoder: msgspec.msgpack.Decoder[M], max_frame: int) -> None:
        self._decoder = decoder
        self._max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[M]:
        header = FRAME.size
        if not self._buffer and len(data) > header:
            (length,) = FRAME.unpack_from(data)
            if len(data) == header + length <= self._max_frame + header:  # exactly one frame
                return [self._decoder.decode(memoryview(data)[header:])]
        buffer = self._buffer
        buffer += data
        messages: list[M] = []
        pos = 0
        with memoryview(buffer) as view:
            while len(buffer) - pos >= header:
                (length,) = FRAME.unpack_from(buffer, pos)
                if length > self._max_frame:
                    raise ValueError(
                        f"a frame of {length} bytes is over the {self._max_frame}-byte limit"
                    )
                end = pos + header + length
                if len(buffer) < end:
                    break
                messages.append(self._decoder.decode(view[pos + header : end]))
                pos = end
        del buffer[:pos]
        return messages


class FrameWriter:
    """Frames to one peer over an asyncio transport. Frames written in one turn of the event
    loop leave in one system call (a batch's replies finish together; a relay's calls often
    arrive together). Its protocol forwards pause_writing/resume_writing here."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._resumed: asyncio.Future[None] | None = None  # set while the peer is behind
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def write(self, message: msgspec.Struct) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(frame(message))

    def _flush(self) -> None:
        frames, self._pending = self._pending, []
        if not self._transport.is_closing():
            self._transport.writelines(frames)

    async def backpressure(self) -> None:
        """Wait while more than WRITE_HIGH_WATER bytes are queued for the peer (one that stopped
        reading does not grow the buffer forever)."""
        if self._resumed is not None:
            await asyncio.shield(self._resumed)

    def pause_writing(self) -> None:
        if self._resumed is None:
            self._resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._resumed is not None:
            self._resumed.set_result(None)
            self._resumed = None

    @property
    def closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()
        self.resume_writing()  # nobody waits on a closed connection


class FramedProtocol(asyncio.Protocol, Generic[M]):
    """One end of a relay connection: frames in, decoded (``received``), a FrameWriter out
    (``writer``, once connected), with the transport's back-pressure wired to it. A stream that
    cannot be decoded is beyond repair: ``malformed`` is told why and the connection aborts."""

    def __init__(self, decoder: msgspec.msgpack.Decoder[M], max_frame: int) -> None:
        self._frames = FrameDecoder(decoder, max_frame)
        self._transport: asyncio.Transport | None = None
        self.writer: FrameWriter | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.writer = FrameWriter(self._transport)  # type: ignore[arg-type]
        self.connected(self.writer)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._frames.feed(data)
        except (msgspec.DecodeError, ValueError) as exc:
            self.malformed(str(exc))
            self.abort()
            return
        self.received(messages)

    def connected(self, writer: FrameWriter) -> None:
        """The connection is up; ``writer`` sends frames on it."""

    def received(self, messages: list[M]) -> None:
        raise NotImplementedError

    def malformed(self, reason: str) -> None:
        """Log why; the connection is aborted next."""

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def pause_writing(self) -> None:
        if self.writer is not None:
            self.writer.pause_writing()

    def resume_writing(self) -> None:
        if self.writer is not None:
            self.writer.resume_writing()


def unary_methods() -> dict[str, type[Any]]:
    """Every unary-unary method a relay passes on, with its request type."""
    from serve.frontend.pb import grpc_service_pb2 as pb  # generated: imported where used

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {
        f"/{INFER_SERVICE}/{m.name}": getattr(pb, m.input_type.name)
        for m in service.methods
        if not m.client_streaming and not m.server_streaming
    }
    methods[HEALTH_CHECK] = health_pb2.HealthCheckRequest
    return methods


def stream_methods() -> dict[str, type[Any]]:
    """Every server-streaming method a relay passes on, with its request type."""
    return {HEALTH_WATCH: health_pb2.HealthCheckRequest}


# A ModelInferResponse's parameters (field 4) holding one entry: "triton_final_response" (key,
# field 1) → an InferParameter (value, field 2) whose bool_param (field 1) is true. Appended to a
# serialised response, it adds that entry (protobuf merges concatenated messages).
FINAL_RESPONSE_PARAMETER = b"\x22\x1b\x0a\x15triton_final_response\x12\x02\x08\x01"


def stream_answer(response: bytes) -> bytes:
    """A serialised ModelStreamInferResponse carrying a serialised ModelInferResponse
    (infer_response, field 2), without parsing it, marked as the request's final response as
    Triton marks every answer on a stream (clients of decoupled models wait for it)."""
    inner_size = len(response) + len(FINAL_RESPONSE_PARAMETER)
    return b"\x12" + _varint(inner_size) + response + FINAL_RESPONSE_PARAMETER


def stream_error(message: str, request_id: str = "") -> bytes:
    """A serialised ModelStreamInferResponse carrying ``message`` (error_message, field 1) and
    an infer_response (field 2) marked final that has the request's id (field 3), if it had
    one, so that a client can tell which of its requests failed."""
    text = message.encode()
    inner = FINAL_RESPONSE_PARAMETER
    if request_id:
        name = request_id.encode()
        inner = b"\x1a" + _varint(len(name)) + name + inner
    return b"\x0a" + _varint(len(text)) + text + b"\x12" + _varint(len(inner)) + inner


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a length."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
