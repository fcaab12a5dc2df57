"""The parent's end of a worker's socket: an asyncio protocol that frames and decodes messages."""

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
        self, on_message: Callable[[FromWorker], None], on_lost: Callable[[str], None]
    ) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

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
                self._on_message(message)
                return
        buffer = self._buffer
        buffer += data
        header = FRAME_HEADER.size
        pos = 0
        messages: list[FromWorker] = []
        with memoryview(buffer) as view:
            while len(buffer) - pos >= header:
                (length,) = FRAME_HEADER.unpack_from(buffer, pos)
                end = pos + header + length
                if length > MAX_FRAME_BYTES:
                    self._fail(f"frame of {length} bytes exceeds the limit")
                    return
                if len(buffer) < end:
                    break
                try:
                    messages.append(from_worker_decoder.decode(view[pos + header : end]))
                except Exception as exc:
                    self._fail(f"undecodable message: {exc}")
                    return
                pos = end
        if pos:
            del buffer[:pos]
        for message in messages:
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._on_lost(f"channel closed ({exc})" if exc else "channel closed")

    def send(self, message: ToWorker) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError("worker channel is closed")
        self._transport.write(frame(message))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, reason: str) -> None:
        log.error("worker protocol error: %s; closing the channel", reason)
        if self._transport is not None:
            self._transport.abort()
