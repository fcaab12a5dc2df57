"""The serving process's side of the gRPC relays (``frontends > 1``).

Relay processes terminate gRPC (HTTP/2, the C core, one coroutine per call: most of what one
Python process spends per call) and pass each unary call on as its method name and serialised
request bytes. The hub runs the call through the same servicer methods a direct call reaches and
sends back the serialised response or the status. The runtime, batching, the warm pool,
readiness, model control and metrics stay in this one process, so batches form from every
connection's calls together and one worker pool feeds each GPU.

Wire: a 4-byte little-endian length, then a msgpack message; the relay's first message is a
Hello with the relay protocol version. A relay whose caller cancels (or whose wait for a reply
runs out) sends a RelayCancel: the hub cancels that call, so a request still queued is never
computed, as on a direct connection.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import msgspec
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.status import status_for

if TYPE_CHECKING:  # a relay process imports this module too, and needs neither
    from serve.frontend.health import HealthService
    from serve.frontend.servicer import InferenceServicer

log = logging.getLogger(__name__)

RELAY_VERSION = 2
FRAME = struct.Struct("<I")
STREAM_LIMIT = 4 * 1024 * 1024  # bytes buffered per connection before reading pauses
FRAME_MARGIN = 1024 * 1024  # a frame is at most a gRPC message (max_message_bytes) + this
INFER_SERVICE = "inference.GRPCInferenceService"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
OK = grpc.StatusCode.OK.value[0]
WRITE_HIGH_WATER = 64 * 1024 * 1024  # bytes of replies queued for a relay before waiting


class Hello(msgspec.Struct, frozen=True, tag=True, array_like=True):
    version: int
    relay: int  # the relay's index, for per-relay counts


class RelayCall(msgspec.Struct, frozen=True, tag=True, array_like=True):
    id: int
    method: str  # "/package.Service/Method"
    timeout_s: float | None  # what was left of the caller's deadline when the relay got it
    payload: bytes


class RelayCancel(msgspec.Struct, frozen=True, tag=True, array_like=True):
    id: int  # a RelayCall's id; its caller has gone


class RelayReply(msgspec.Struct, frozen=True, tag=True, array_like=True):
    id: int
    code: int  # grpc.StatusCode value; 0 is OK
    details: str
    payload: bytes


ToHub = Hello | RelayCall | RelayCancel
to_hub_decoder = msgspec.msgpack.Decoder(ToHub)
reply_decoder = msgspec.msgpack.Decoder(RelayReply)
_encoder = msgspec.msgpack.Encoder()


def frame(message: msgspec.Struct) -> bytes:
    body = _encoder.encode(message)
    return FRAME.pack(len(body)) + body


class FrameWriter:
    """Frames written in one turn of the event loop leave in one system call: the replies of a
    batch finish together, and a relay's calls often arrive together."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []

    def write(self, message: msgspec.Struct) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(frame(message))

    def _flush(self) -> None:
        frames, self._pending = self._pending, []
        if not self._writer.is_closing():
            self._writer.writelines(frames)

    async def backpressure(self) -> None:
        """Wait while more than WRITE_HIGH_WATER bytes are queued (a reader that stopped
        reading does not grow the buffer forever)."""
        if self._writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await self._writer.drain()

    @property
    def closing(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        self._writer.close()


def unary_methods() -> dict[str, type[Any]]:
    """Every unary-unary method a relay passes on, with its request type."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {
        f"/{INFER_SERVICE}/{m.name}": getattr(pb, m.input_type.name)
        for m in service.methods
        if not m.client_streaming and not m.server_streaming
    }
    methods[HEALTH_CHECK] = health_pb2.HealthCheckRequest
    return methods


class RelayAbort(grpc.aio.AbortError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class RelayedContext:
    """What the servicer methods use of a grpc.aio context, for a relayed call."""

    def __init__(self, timeout_s: float | None) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RelayAbort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


Handler = Callable[[Any, Any], Awaitable[Any]]


class RelayHub:
    def __init__(
        self, servicer: InferenceServicer, health: HealthService, folder: Path, max_message: int
    ) -> None:
        self.path = folder / "hub.sock"
        self._max_frame = max_message + FRAME_MARGIN
        self._handlers: dict[str, tuple[Handler, type[Any]]] = {}
        for method, request_type in unary_methods().items():
            owner: Any = health if method == HEALTH_CHECK else servicer
            self._handlers[method] = (getattr(owner, method.rsplit("/", 1)[1]), request_type)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls: dict[int, int] = {}  # relay index → calls answered

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._serve_relay, path=str(self.path), limit=STREAM_LIMIT
        )
        self.path.chmod(0o600)
        log.info("relay hub listening on %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve_relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        replies = FrameWriter(writer)
        relay = -1
        running: dict[int, asyncio.Task[None]] = {}  # call id → its answer, while it runs
        try:
            hello = to_hub_decoder.decode(await _read_frame(reader, self._max_frame))
            if not isinstance(hello, Hello) or hello.version != RELAY_VERSION:
                log.error("a relay spoke relay protocol %r, not %d; dropped", hello, RELAY_VERSION)
                return
            relay = hello.relay
            self.calls.setdefault(relay, 0)
            log.info("relay %d connected", relay)
            while True:
                call = to_hub_decoder.decode(await _read_frame(reader, self._max_frame))
                if isinstance(call, RelayCall):
                    self._start(call, replies, relay, running)
                elif isinstance(call, RelayCancel):
                    self._cancel(call.id, relay, running)
                else:
                    raise ValueError(f"expected a call, got {type(call).__name__}")
        except (asyncio.IncompleteReadError, ConnectionError):
            log.info("relay %d disconnected", relay)
        except (msgspec.DecodeError, ValueError) as exc:
            log.error("relay %d sent a malformed message, dropped: %s", relay, exc)
        finally:
            self._tasks.discard(task)
            writer.close()
            if running:  # nobody waits for them any more
                log.warning("relay %d: cancelling its %d calls in progress", relay, len(running))
                for answer in list(running.values()):
                    answer.cancel()

    def _start(
        self,
        call: RelayCall,
        replies: FrameWriter,
        relay: int,
        running: dict[int, asyncio.Task[None]],
    ) -> None:
        answer = asyncio.create_task(self._answer(call, replies, relay))
        self._tasks.add(answer)
        running[call.id] = answer

        def finished(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if running.get(call.id) is task:
                del running[call.id]

        answer.add_done_callback(finished)

    @staticmethod
    def _cancel(call_id: int, relay: int, running: dict[int, asyncio.Task[None]]) -> None:
        answer = running.pop(call_id, None)
        if answer is not None:
            log.debug("relay %d: call %d cancelled by its caller", relay, call_id)
            answer.cancel()

    async def _answer(self, call: RelayCall, replies: FrameWriter, relay: int) -> None:
        reply = await self.dispatch(call)
        self.calls[relay] = self.calls.get(relay, 0) + 1
        if not replies.closing:
            replies.write(reply)
            await replies.backpressure()

    async def dispatch(self, call: RelayCall) -> RelayReply:
        """Run one relayed call through the servicer; never raises (a cancelled call is
        cancelled: nobody waits for its reply)."""
        entry = self._handlers.get(call.method)
        if entry is None:
            code = grpc.StatusCode.UNIMPLEMENTED
            return RelayReply(call.id, code.value[0], f"method {call.method} not served", b"")
        handler, request_type = entry
        context = RelayedContext(call.timeout_s)
        try:
            request = request_type.FromString(call.payload)
        except DecodeError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            return RelayReply(call.id, code.value[0], f"malformed request message: {exc}", b"")
        try:
            async with asyncio.timeout(call.timeout_s):  # as gRPC cancels a handler at its deadline
                response = await handler(request, context)
        except RelayAbort as abort:
            return RelayReply(call.id, abort.code.value[0], abort.details, b"")
        except NotImplementedError:
            code = context.code or grpc.StatusCode.UNIMPLEMENTED
            return RelayReply(call.id, code.value[0], context.details or "not implemented", b"")
        except TimeoutError:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            return RelayReply(call.id, code.value[0], "deadline exceeded", b"")
        except Exception as exc:  # a bug: handlers map every expected error themselves
            code, message = status_for(exc)  # INTERNAL, with a trace id in the log
            return RelayReply(call.id, code.value[0], message, b"")
        return RelayReply(call.id, OK, "", response.SerializeToString())


async def _read_frame(reader: asyncio.StreamReader, max_frame: int) -> bytes:
    (length,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    if length > max_frame:
        raise ValueError(f"a frame of {length} bytes is over the {max_frame}-byte limit")
    return await reader.readexactly(length)
