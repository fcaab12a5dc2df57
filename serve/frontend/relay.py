"""A gRPC relay process (``frontends > 1``): terminates gRPC on the shared port and passes each
unary call and each Health/Watch stream, as bytes, to the serving process's hub (relay_hub.py)
over the relay wire (relay_wire.py); each request of a ModelStreamInfer stream goes as a
ModelInfer call of its own.

It binds the port with SO_REUSEPORT beside its sibling relays, so the kernel spreads connections
over them. The serving process answers readiness, errors and results. The relay parses only a
large ModelInfer request, to put its raw tensors into its ring (relay_wire.RelayRing) and pass
the rest of the request; a request it cannot parse or place goes on whole. When
the hub goes away (the serving process died or is stopping) every call in flight fails with
UNAVAILABLE and the relay stops; SIGTERM stops it gracefully. SIGUSR1 drains it first (a
recycle): it stops listening and waits for its clients to move to the other relays
(listener.drain), then stops. SIGUSR2 does the same for the whole server's stop, but waits only
until no client is busy on it (the supervisor sends SIGTERM if that takes too long).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import signal
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import grpc

from serve.errors import InflightLimitError
from serve.frontend import listener
from serve.frontend.admission import RELAYED_ANSWER_COPIES, InflightBudget, release_once_sent
from serve.frontend.relay_wire import (
    FRAME_MARGIN,
    MODEL_INFER,
    MODEL_STREAM_INFER,
    RELAY_VERSION,
    RING_MIN_BYTES,
    FramedProtocol,
    FrameWriter,
    Hello,
    Ping,
    Pong,
    RelayCall,
    RelayCancel,
    RelayReply,
    RelayRing,
    RelayStream,
    from_hub_decoder,
    stream_answer,
    stream_error,
    stream_methods,
    unary_methods,
)
from serve.frontend.streams import serve_stream
from serve.memory import freeze_long_lived

log = logging.getLogger(__name__)

CODES = {code.value[0]: code for code in grpc.StatusCode}
DEFAULT_BUDGET_BYTES = 1 << 30  # as ServerConfig.max_inflight_bytes


class HubGoneError(ConnectionError):
    pass


class RelayError(Exception):
    """The hub ended a streaming call with this status."""

    def __init__(self, reply: RelayReply) -> None:
        super().__init__(reply.details)
        self.reply = reply


class _Closing:
    """The relay is stopping: a server-streaming call it passes on ends (HubLink.end_streams)."""


StreamItem = bytes | RelayReply | HubGoneError | _Closing


class HubLink(FramedProtocol[RelayReply | RelayStream | Ping]):
    """Calls to the hub, matched to replies by id, over one Unix socket."""

    def __init__(
        self, path: str, relay: int, max_frame: int, ring: RelayRing | None = None
    ) -> None:
        super().__init__(from_hub_decoder, max_frame)
        self._path = path
        self._relay = relay
        self._ring = ring
        self._ring_slots: dict[int, int] = {}  # call id → its ring slot, until the call's reply
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[RelayReply]] = {}
        self._streams: dict[int, asyncio.Queue[StreamItem]] = {}  # streaming calls' messages
        self.lost = asyncio.Event()

    async def connect(self) -> None:
        await asyncio.get_running_loop().create_unix_connection(lambda: self, self._path)

    def connected(self, writer: FrameWriter) -> None:
        writer.write(Hello(RELAY_VERSION, self._relay))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    async def call(self, method: str, payload: bytes, timeout_s: float | None) -> RelayReply:
        writer = self.writer
        if self.lost.is_set() or writer is None:
            raise HubGoneError("the serving process is gone")
        call_id = next(self._ids)
        future: asyncio.Future[RelayReply] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        places = None
        if method == MODEL_INFER and self._ring is not None and len(payload) >= RING_MIN_BYTES:
            placed = self._place(payload)
            if placed is not None:
                payload, places, self._ring_slots[call_id] = placed
        try:
            writer.write(RelayCall(call_id, method, timeout_s, payload, places))
            await writer.backpressure()  # the serving process is behind: wait for it
            return await future
        except asyncio.CancelledError:
            # The caller cancelled, or gRPC ended the call at its deadline: the hub drops the
            # call too.
            if not (future.done() and not future.cancelled()):  # (cancelling us cancels it)
                self._give_up(call_id, method)
            raise
        finally:
            self._pending.pop(call_id, None)

    async def stream(
        self, method: str, payload: bytes, timeout_s: float | None
    ) -> AsyncIterator[bytes]:
        """A server-streaming call: its messages as they come. Raises RelayError when the hub
        ends it with a status other than OK, HubGoneError when the hub goes away."""
        writer = self.writer
        if self.lost.is_set() or writer is None:
            raise HubGoneError("the serving process is gone")
        call_id = next(self._ids)
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._streams[call_id] = queue
        ended = False
        try:
            writer.write(RelayCall(call_id, method, timeout_s, payload))
            while True:
                item = await queue.get()
                if isinstance(item, bytes):
                    yield item
                    continue
                if isinstance(item, _Closing):  # the hub drops its end (_give_up)
                    break
                ended = True
                if isinstance(item, HubGoneError):
                    raise item
                if item.code:
                    raise RelayError(item)
                return
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away (or its deadline)
            if not ended:
                self._give_up(call_id, method)
            raise
        finally:
            self._streams.pop(call_id, None)
        self._give_up(call_id, method)  # (closed by end_streams: the hub's end goes too)

    def end_streams(self) -> None:
        """The relay is stopping: every server-streaming call it passes on (a health Watch,
        which would otherwise hold the graceful stop for its whole grace period) ends, after
        the messages already received, with OK; the hub drops its end."""
        for queue in self._streams.values():
            queue.put_nowait(_Closing())

    def _place(self, payload: bytes) -> tuple[bytes, list[tuple[int, int]], int] | None:
        """A ModelInfer request's raw tensors put into the ring: (the request without them,
        their places, the slot); None to send it whole (no free slot, too large, no raw
        tensors, or not a request the relay can parse: the serving process says what is
        wrong with it)."""
        from google.protobuf.message import DecodeError

        from serve.frontend.pb import grpc_service_pb2 as pb  # generated: imported where used

        assert self._ring is not None
        try:
            request = pb.ModelInferRequest.FromString(payload)
        except DecodeError:
            return None
        raw = request.raw_input_contents
        if not raw:
            return None
        placed = self._ring.put(list(raw))
        if placed is None:
            return None
        slot, places = placed
        del raw[:]
        return request.SerializeToString(), places, slot

    def _give_up(self, call_id: int, method: str) -> None:
        writer = self.writer
        if writer is not None and not self.lost.is_set() and not writer.closing:
            log.debug("call %d to %s given up by its caller; telling the hub", call_id, method)
            writer.write(RelayCancel(call_id))

    def malformed(self, reason: str) -> None:
        log.error("the serving process sent a malformed reply (%s); dropping the link", reason)

    def received(self, replies: list[RelayReply | RelayStream | Ping]) -> None:
        pending = self._pending
        for reply in replies:
            if isinstance(reply, Ping):  # the hub checks that this loop still runs
                if self.writer is not None:
                    self.writer.write(Pong(reply.seq))
                continue
            if self._ring_slots and isinstance(reply, RelayReply):
                slot = self._ring_slots.pop(reply.id, None)
                if slot is not None and self._ring is not None:  # the hub is done with it
                    self._ring.release(slot)
            future = pending.get(reply.id)
            if future is not None:
                if not future.done() and isinstance(reply, RelayReply):
                    future.set_result(reply)
                continue
            stream = self._streams.get(reply.id)
            if stream is not None:
                stream.put_nowait(reply.payload if isinstance(reply, RelayStream) else reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pending:
            log.warning(
                "lost the serving process (%s); failing %d calls",
                exc or "it closed the link",
                len(self._pending),
            )
        self.lost.set()
        self.resume_writing()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(HubGoneError("the serving process is gone"))
        for stream in self._streams.values():
            stream.put_nowait(HubGoneError("the serving process is gone"))


class Forwarder(grpc.GenericRpcHandler):
    """Every unary method of the inference service, Health/Check and Health/Watch, passed on
    as bytes; ModelStreamInfer as one ModelInfer call per request."""

    def __init__(self, link: HubLink, budget: InflightBudget | None = None) -> None:
        self._link = link
        # The ModelInfer answers this relay has not sent yet (a caller that does not read its
        # answers makes gRPC keep them here), until gRPC has sent them; while they hold all of
        # it, new ModelInfer calls are refused. (The serving process counts the requests.)
        self._budget = budget if budget is not None else InflightBudget(DEFAULT_BUDGET_BYTES)
        # set when the relay stops: open streams are answered and closed (close_streams)
        self._streams_closing = asyncio.Event()
        self._handlers = {
            method: grpc.unary_unary_rpc_method_handler(functools.partial(self._forward, method))
            for method in unary_methods()
        }
        for method in stream_methods():
            forward = functools.partial(self._forward_stream, method)
            self._handlers[method] = grpc.unary_stream_rpc_method_handler(forward)
        self._handlers[MODEL_STREAM_INFER] = grpc.stream_stream_rpc_method_handler(
            self._forward_infer_stream
        )

    def service(self, handler_call_details: Any) -> Any:
        return self._handlers.get(handler_call_details.method)  # None: UNIMPLEMENTED

    async def _forward(self, method: str, payload: bytes, context: grpc.aio.ServicerContext) -> Any:
        if method != MODEL_INFER:
            return await self._forward_call(method, payload, context)
        budget = self._budget
        try:
            budget.check_room()
        except InflightLimitError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            raise  # not reached: abort raises
        answer = await self._forward_call(method, payload, context)
        release_once_sent(budget, budget.hold(RELAYED_ANSWER_COPIES * len(answer)))
        return answer

    async def _forward_call(
        self, method: str, payload: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        try:
            reply = await self._link.call(method, payload, context.time_remaining())
        except HubGoneError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the serving process is restarting")
            raise  # not reached: abort raises
        if context.time_remaining() == 0:  # (None: no deadline)
            # The call's deadline passed while the hub answered: gRPC has ended it, and an
            # answer sent now fails in its core, which logs it as an ERROR with a traceback.
            raise asyncio.CancelledError  # (ends the handler quietly, as gRPC's own cancel does)
        if reply.code:
            await context.abort(CODES.get(reply.code, grpc.StatusCode.UNKNOWN), reply.details)
        return reply.payload

    async def _forward_stream(
        self, method: str, payload: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            async for message in self._link.stream(method, payload, context.time_remaining()):
                yield message
        except HubGoneError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the serving process is restarting")
        except RelayError as error:
            code = CODES.get(error.reply.code, grpc.StatusCode.UNKNOWN)
            await context.abort(code, error.reply.details)

    async def _forward_infer_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Each request of the stream goes to the hub as a ModelInfer call (through the ring
        when it is large), concurrently, and each answer comes back on the stream as it
        completes: the hub's response, or its error for that request alone."""

        budget = self._budget

        async def answer(payload: bytes) -> tuple[bytes, int]:
            try:  # as for a unary call: refused while unsent answers hold the whole budget
                budget.check_room()
            except InflightLimitError as exc:
                return stream_error(str(exc), _request_id(payload)), 0
            reply = await self._link.call(MODEL_INFER, payload, context.time_remaining())
            if reply.code:
                return stream_error(reply.details, _request_id(payload)), 0
            message = stream_answer(reply.payload)
            return message, budget.hold(RELAYED_ANSWER_COPIES * len(message))

        try:
            async for message in serve_stream(
                requests, answer, budget, self._streams_closing, context
            ):
                yield message
        except HubGoneError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the serving process is restarting")

    def close_streams(self) -> None:
        """The relay is stopping: open streams answer what they have read, then end
        UNAVAILABLE (as the serving process's own, InferenceServicer.close_streams); passed-on
        server streams (health Watch) end (HubLink.end_streams)."""
        self._streams_closing.set()
        self._link.end_streams()


def _request_id(payload: bytes) -> str:
    """A serialised ModelInferRequest's id ("" if it has none or does not parse)."""
    from google.protobuf.message import DecodeError

    from serve.frontend.pb import grpc_service_pb2 as pb  # generated: imported where used

    try:
        return str(pb.ModelInferRequest.FromString(payload).id)
    except DecodeError:
        return ""


async def run_relay(
    index: int,
    hub_path: str,
    address: str,
    max_message_bytes: int,
    grace_s: float,
    conn: Connection,
    ring: RelayRing | None = None,
    budget: InflightBudget | None = None,
    connection_age_s: float = 0.0,
    drain_s: float = 0.0,
    leave_s: float = 0.0,
) -> int:
    """Serve until SIGTERM (graceful), SIGUSR1 (drain, then a graceful stop), SIGUSR2 (drain
    until no client is busy, then a graceful stop) or until the hub goes away. ``budget``: for
    the answers this relay has not sent yet (its share of max_inflight_bytes).
    ``connection_age_s``: gRPC sends each connection a GOAWAY after this long (0: never), and
    its client moves to a new one; ``drain_s``: how long a drain (SIGUSR1) waits for the last
    connection to go; ``leave_s``: how long the whole server's stop (SIGUSR2) waits for the
    last busy client."""
    link = HubLink(hub_path, index, max_message_bytes + FRAME_MARGIN, ring)
    await link.connect()
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1),  # beside the sibling relays
            *listener.connection_age_options(connection_age_s),
        ]
    )
    forwarder = Forwarder(link, budget)
    server.add_generic_rpc_handlers((forwarder,))
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        log.error("cannot listen on %s: %s", address, exc)
        return 2
    await server.start()
    stop, draining, leaving = asyncio.Event(), asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, draining.set)  # (before the port is reported)
    loop.add_signal_handler(signal.SIGUSR2, leaving.set)
    conn.send(port)
    log.info("relay %d listening on %s", index, address)
    freeze_long_lived(f"relay {index}")
    await _first(stop.wait(), draining.wait(), leaving.wait(), link.lost.wait())
    name = f"relay {index}"
    if draining.is_set() and not leaving.is_set() and not stop.is_set() and not link.lost.is_set():
        # (a recycle; the whole server's stop, if it comes meanwhile, takes over)
        await _first(
            listener.drain(name, port, drain_s), leaving.wait(), stop.wait(), link.lost.wait()
        )
    if leaving.is_set() and not stop.is_set() and not link.lost.is_set():
        await _first(listener.drain(name, port, leave_s, quiet=True), stop.wait(), link.lost.wait())
    lost = link.lost.is_set()
    log.info("relay %d stopping (%s)", index, "hub gone" if lost else "graceful")
    forwarder.close_streams()
    await server.stop(0 if lost else grace_s)
    await link.close()
    return 0


async def _first(*waits: Any) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
