"""The serving process's side of the gRPC relays (``frontends > 1``).

Relay processes terminate gRPC (HTTP/2, the C core, one coroutine per call: most of what one
Python process spends per call) and pass each unary call on as its method name and serialised
request (relay_wire.py). The hub runs the call through the same servicer methods a direct call
reaches and sends back the serialised response or the status. The runtime, batching, the warm
pool, readiness, model control and metrics stay in this one process, so batches form from every
connection's calls together and one worker pool feeds each GPU.

A call's deadline is enforced where its gRPC call lives, in the relay: at the deadline (or when
the caller cancels) the relay sends RelayCancel and the hub cancels the call, so a request still
queued is never computed, as on a direct connection. The calls of a relay that disconnects are
cancelled too.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from serve.frontend.malformed import MALFORMED
from serve.frontend.relay_wire import (
    FRAME_MARGIN,
    HEALTH_CHECK,
    HEALTH_WATCH,
    MODEL_INFER,
    OK,
    RELAY_VERSION,
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
    stream_methods,
    to_hub_decoder,
    unary_methods,
)
from serve.frontend.status import status_for

if TYPE_CHECKING:
    from serve.frontend.health import HealthService
    from serve.frontend.servicer import InferenceServicer

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]
CANCELLED = grpc.StatusCode.CANCELLED.value[0]


class RelayAbort(grpc.aio.AbortError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class RelayedContext:
    """What the servicer methods use of a grpc.aio context, for a relayed call. A streaming
    call's messages (``write``) go to ``replies`` as they come."""

    def __init__(
        self, call: RelayCall, replies: FrameWriter | None = None, streaming: bool = False
    ) -> None:
        timeout_s = call.timeout_s
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._id = call.id
        self._replies = replies if streaming else None
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def write(self, message: Any) -> None:
        if self._replies is None:
            raise RuntimeError("write() on a unary call")
        if not self._replies.closing:  # (a relay that is gone has its calls cancelled)
            self._replies.write(RelayStream(self._id, message.SerializeToString()))
            await self._replies.backpressure()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RelayAbort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class RelayHub:
    def __init__(
        self, servicer: InferenceServicer, health: HealthService, folder: Path, max_message: int
    ) -> None:
        self.path = folder / "hub.sock"
        self.max_message = max_message
        self.max_frame = max_message + FRAME_MARGIN
        self._handlers: dict[str, tuple[Handler, type[Any]]] = {}
        streaming = stream_methods()
        for method, request_type in {**unary_methods(), **streaming}.items():
            owner: Any = health if method in (HEALTH_CHECK, HEALTH_WATCH) else servicer
            self._handlers[method] = (getattr(owner, method.rsplit("/", 1)[1]), request_type)
        self._streaming = set(streaming)
        self._server: asyncio.Server | None = None
        self._connections: set[RelayConnection] = set()
        self.calls: dict[int, int] = {}  # relay index → calls answered
        self.ring_calls: dict[int, int] = {}  # relay index → calls whose tensors were in its ring
        self.rings: dict[int, RelayRing] = {}  # relay index → its ring, mapped (set by Relays)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: RelayConnection(self), path=str(self.path)
        )
        self.path.chmod(0o600)
        log.info("relay hub listening on %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        connections, self._connections = self._connections, set()
        running = [call for c in connections for call in c.close()]
        await asyncio.gather(*running, return_exceptions=True)

    def opened(self, connection: RelayConnection) -> None:
        self._connections.add(connection)

    def ping(self, relay: int) -> float | None:
        """Ping relay ``relay``'s connections; for how many seconds a ping to it has gone
        unanswered (0: it has answered every ping; any message counts as an answer), or None
        while it has no connection that said Hello."""
        silences = [c.ping() for c in self._connections if c.relay == relay]
        return min(silences) if silences else None

    def closed(self, connection: RelayConnection) -> None:
        self._connections.discard(connection)

    async def dispatch(
        self, call: RelayCall, replies: FrameWriter | None = None, ring: RelayRing | None = None
    ) -> RelayReply:
        """Run one relayed call through the servicer (a streaming call's messages go to
        ``replies`` first); never raises (a cancelled call is cancelled: nobody waits for its
        reply). ``ring``: the relay's, where a ModelInfer's tensors may be."""
        entry = self._handlers.get(call.method)
        if entry is None:
            code = grpc.StatusCode.UNIMPLEMENTED
            return RelayReply(call.id, code.value[0], f"method {call.method} not served", b"")
        handler, request_type = entry
        context = RelayedContext(call, replies, call.method in self._streaming)
        try:
            request = request_type.FromString(call.payload)
            raw = None
            if call.ring is not None:
                if ring is None or call.method != MODEL_INFER:
                    raise ValueError(f"{call.method} sent with ring places the hub cannot read")
                raw = ring.parts(call.ring)
        except (DecodeError, ValueError) as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            return RelayReply(call.id, code.value[0], f"{MALFORMED}: {exc}", b"")
        try:
            if raw is None:
                response = await handler(request, context)
            else:
                response = await handler(request, context, raw)
        except RelayAbort as abort:
            return RelayReply(call.id, abort.code.value[0], abort.details, b"")
        except NotImplementedError:
            code = context.code or grpc.StatusCode.UNIMPLEMENTED
            return RelayReply(call.id, code.value[0], context.details or "not implemented", b"")
        except Exception as exc:  # a bug: handlers map every expected error themselves
            code, message = status_for(exc)  # INTERNAL, with a trace id in the log
            return RelayReply(call.id, code.value[0], message, b"")
        payload = b"" if response is None else response.SerializeToString()  # None: streamed
        if len(payload) > self.max_message:  # as gRPC answers it on a direct connection; a
            # frame over the relay's limit would cost the relay its link and every call on it
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            details = (
                f"the response is {len(payload)} bytes, over the server's {self.max_message}-byte "
                "message limit (max_message_bytes)"
            )
            log.warning("%s: %s", call.method, details)
            return RelayReply(call.id, code.value[0], details, b"")
        return RelayReply(call.id, OK, "", payload)


class RelayConnection(FramedProtocol[Hello | RelayCall | RelayCancel | Pong]):
    """One relay's connection to the hub: its calls run as tasks, their replies go back."""

    def __init__(self, hub: RelayHub) -> None:
        super().__init__(to_hub_decoder, hub.max_frame)
        self._hub = hub
        self._loop = asyncio.get_running_loop()
        self.relay = -1  # its index, once it said Hello
        self._ring: RelayRing | None = None  # its ring, from then on
        self._running: dict[int, asyncio.Task[None]] = {}  # call id → its task, while it runs
        self._unanswered_since: float | None = None  # the first ping not answered yet
        self._pings = itertools.count()

    def connected(self, writer: FrameWriter) -> None:
        self._hub.opened(self)

    def malformed(self, reason: str) -> None:
        log.error(
            "relay %d sent a malformed message: %s; dropping its connection", self.relay, reason
        )

    def ping(self) -> float:
        """Ping the relay; for how many seconds a ping has gone unanswered."""
        now = time.monotonic()
        if self._unanswered_since is None:
            self._unanswered_since = now
        if self.writer is not None and not self.writer.closing:
            self.writer.write(Ping(next(self._pings)))
        return now - self._unanswered_since

    def received(self, messages: list[Hello | RelayCall | RelayCancel | Pong]) -> None:
        self._unanswered_since = None  # whatever it sent, its loop runs
        for message in messages:
            if isinstance(message, Pong) and self.relay >= 0:
                continue
            if isinstance(message, RelayCall) and self.relay >= 0:
                self._start(message)
            elif isinstance(message, RelayCancel) and self.relay >= 0:
                self._cancel(message.id)
            elif isinstance(message, Hello) and self.relay < 0:
                if message.version != RELAY_VERSION:
                    self._drop(f"spoke relay protocol {message.version}, not {RELAY_VERSION}")
                    return
                self.relay = message.relay
                self._ring = self._hub.rings.get(self.relay)
                self._hub.calls.setdefault(self.relay, 0)
                log.info("relay %d connected", self.relay)
            else:
                self._drop(f"sent {type(message).__name__} out of turn")
                return

    def _start(self, call: RelayCall) -> None:
        task = self._loop.create_task(self._answer(call))
        self._running[call.id] = task
        if call.ring is None:
            task.add_done_callback(lambda _: self._running.pop(call.id, None))
        else:
            task.add_done_callback(functools.partial(self._ring_call_done, call.id))

    def _ring_call_done(self, call_id: int, task: asyncio.Task[None]) -> None:
        """The relay keeps a call's ring space until the call's reply: a cancelled call (even
        one cancelled before it started) is answered too, so that the space comes back."""
        self._running.pop(call_id, None)
        replies = self.writer
        if task.cancelled() and replies is not None and not replies.closing:
            replies.write(RelayReply(call_id, CANCELLED, "cancelled by its caller", b""))

    async def _answer(self, call: RelayCall) -> None:
        replies = self.writer
        reply = await self._hub.dispatch(call, replies, self._ring)
        hub = self._hub
        hub.calls[self.relay] = hub.calls.get(self.relay, 0) + 1
        if call.ring is not None:
            hub.ring_calls[self.relay] = hub.ring_calls.get(self.relay, 0) + 1
        if replies is not None and not replies.closing:
            replies.write(reply)
            await replies.backpressure()

    def _cancel(self, call_id: int) -> None:
        task = self._running.pop(call_id, None)
        if task is not None:
            log.debug("relay %d: call %d cancelled by its caller", self.relay, call_id)
            task.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        log.info("relay %d disconnected%s", self.relay, f" ({exc})" if exc else "")
        self._hub.closed(self)
        self.close()

    def close(self) -> list[asyncio.Task[None]]:
        """Close the connection and cancel its calls in progress (nobody waits for them any
        more); the cancelled tasks."""
        if self.writer is not None:
            self.writer.close()
        running = list(self._running.values())
        self._running.clear()
        if running:
            log.warning("relay %d: cancelling its %d calls in progress", self.relay, len(running))
            for task in running:
                task.cancel()
        return running

    def _drop(self, reason: str) -> None:
        log.error("relay %d %s; dropping its connection", self.relay, reason)
        self.abort()
