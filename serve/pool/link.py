"""The parent's end of a worker's socket: an asyncio protocol that frames and decodes messages.

The protocol is owned by its transport (the event loop reads the socket and calls
data_received); the worker's handle owns both through ``close()``. An exception escaping
data_received would make the event loop close the transport: the worker would count as lost and
every batch in flight on it would fail. So a message handler that raises is logged here, with its
traceback, and the link goes on with the next message; only a corrupt stream (an undecodable or
oversized frame) closes the channel, and the reason reaches ``on_lost``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from serve.pool.messages import (
    FRAME_HEADER,
    MAX_FRAME_BYTES,
    FromWorker,
    ToWorker,
    frame,
    from_worker_decoder,
)

log = logging.getLogger(__name__)


class WorkerLink(asyncio.Protocol):
    def __init__(
        self,
        on_message: Callable[[FromWorker], None],
        on_lost: Callable[[str], None],
        name: str = "?",
    ) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._name = name  # the worker's id, for the log
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._failure = ""  # why the link closed the channel itself

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self._buffer and len(data) > FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(data)
            if len(data) == FRAME_HEADER.size + length:  # the common case: exactly one message
                try:
                    message = from_worker_decoder.decode(memoryview(data)[FRAME_HEADER.size :])
                except Exception as exc:
                    self._fail(f"undecodable message: {exc}")
                    return
                self._handle(message)
                return
        buffer = self._buffer
        buffer += data
        header = FRAME_HEADER.size
        pos = 0
        messages: list[FromWorker] = []
        failure = ""
        with memoryview(buffer) as view:
            while len(buffer) - pos >= header:
                (length,) = FRAME_HEADER.unpack_from(buffer, pos)
                end = pos + header + length
                if length > MAX_FRAME_BYTES:
                    failure = f"frame of {length} bytes exceeds the limit"
                    break
                if len(buffer) < end:
                    break
                try:
                    messages.append(from_worker_decoder.decode(view[pos + header : end]))
                except Exception as exc:
                    failure = f"undecodable message: {exc}"
                    break
                pos = end
        if pos:
            del buffer[:pos]
        for message in messages:  # the good ones before a corrupt frame are still answers
            self._handle(message)
        if failure:
            self._fail(failure)

    def _handle(self, message: FromWorker) -> None:
        """Hand one message on; a handler that raises costs that message, never the link."""
        try:
            self._on_message(message)
        except Exception:
            batch_id = getattr(message, "batch_id", None)
            log.exception(
                "worker %s: handling its %s%s raised; the link goes on",
                self._name,
                type(message).__name__,
                "" if batch_id is None else f" for batch {batch_id}",
            )

    @property
    def protocol_error(self) -> str:
        """Why this side cut the channel (a corrupt stream), or ""."""
        return self._failure

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._failure:
            reason = f"protocol error: {self._failure}"
        else:
            reason = f"channel closed ({exc})" if exc else "channel closed"
        self._on_lost(reason)

    def send(self, message: ToWorker) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError("worker channel is closed")
        self._transport.write(frame(message))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, reason: str) -> None:
        log.error("worker %s: protocol error: %s; closing the channel", self._name, reason)
        self._failure = self._failure or reason
        self._buffer.clear()
        if self._transport is not None:
            self._transport.abort()
