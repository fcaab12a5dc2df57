"""Answering the requests of one bidirectional stream (ModelStreamInfer) concurrently.

Each request is answered on its own, as separate calls would be, so the requests of one stream
batch with each other and with other callers; answers go back in the order they complete. At
most ``limit`` requests of a stream are in flight, counting answers not yet sent: beyond that
the stream is not read, so a fast sender, or a caller that does not read its answers, is held
back by gRPC's flow control rather than queueing without bound. Answers not yet sent can also
hold the server's in-flight budget until they leave (``release``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from serve.frontend.admission import InflightBudget

log = logging.getLogger(__name__)

STREAM_INFLIGHT = 256  # requests of one stream in flight at once

Request = TypeVar("Request")
Answer = TypeVar("Answer")


class _End:
    """The requests ended and every answer was queued."""


class _Closed:
    """The stream was closed (``closing``) and every answer to what it had read was queued."""


class StreamClosed(Exception):
    """The server closed the stream (it is stopping) once it had answered every request it had
    read; its caller should send any request that got no answer again, on a new stream."""


async def answer_concurrently(
    requests: AsyncIterable[Request],
    answer: Callable[[Request], Awaitable[Answer]],
    limit: int = STREAM_INFLIGHT,
    release: Callable[[Answer], None] | None = None,
    closing: asyncio.Event | None = None,
) -> AsyncIterator[Answer]:
    """Each answer as it completes. ``answer`` must turn a request's own failure into an
    answer; anything it raises ends the stream with that error (after the requests in flight
    are cancelled), as does an error reading the requests. Closing the iterator (the caller
    went away) cancels whatever is still running.

    ``release`` is called exactly once for every answer ``answer`` returned: when the caller
    asks for the one after it (gRPC has sent it), or when the stream ends with it unsent. So an
    answer can hold a share of the in-flight budget from the moment it is made (``answer``
    takes it just before it returns) until it has left.

    Once ``closing`` is set (the server is stopping) no further request is read; the answers
    to those in flight still come, then StreamClosed ends the stream (unless the requests had
    ended by then: the stream then ends as usual)."""
    answers: asyncio.Queue[Answer | _End | _Closed | BaseException] = asyncio.Queue()
    room = asyncio.Semaphore(limit)
    running: set[asyncio.Task[None]] = set()
    read_all = False  # the requests ended: closing no longer matters

    async def one(request: Request) -> None:
        try:
            answers.put_nowait(await answer(request))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # not a request's own failure: it ends the stream
            answers.put_nowait(exc)

    async def read() -> None:
        nonlocal read_all
        try:
            incoming = aiter(requests)
            while True:
                await room.acquire()  # (room first: a request, once read, is always answered)
                try:
                    request = await anext(incoming)
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            read_all = True
            if running:
                await asyncio.wait(set(running))
            answers.put_nowait(_End())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            answers.put_nowait(exc)

    async def close_when(closing: asyncio.Event) -> None:
        await closing.wait()
        if read_all or reader.done():
            return
        reader.cancel()  # (it waits for room or for the next request: none is lost)
        await asyncio.gather(reader, return_exceptions=True)
        if running:
            await asyncio.wait(set(running))
        answers.put_nowait(_Closed())

    reader = asyncio.create_task(read())
    closer = None if closing is None else asyncio.create_task(close_when(closing))
    sent = 0
    in_hand: Answer | None = None  # the answer yielded, until the caller asks for the next
    try:
        while True:
            item = await answers.get()
            if isinstance(item, _End):
                return
            if isinstance(item, _Closed):
                raise StreamClosed(
                    "the server is stopping: this stream was closed once every request it had "
                    "read was answered; send any request that got no answer again, on a new stream"
                )
            if isinstance(item, BaseException):
                raise item
            in_hand = item
            yield item
            in_hand = None
            if release is not None:
                release(item)
            sent += 1
            room.release()  # sent (the caller asked for the next): room for another request
    finally:
        reader.cancel()
        if closer is not None:
            closer.cancel()
        for task in list(running):
            task.cancel()  # (a cancelled request queues no answer: it raises where it waits)
        if release is not None:
            unsent = [] if in_hand is None else [in_hand]
            while not answers.empty():
                leftover = answers.get_nowait()
                if not isinstance(leftover, (_End, _Closed, BaseException)):
                    unsent.append(leftover)
            for item in unsent:
                release(item)
        log.debug("stream ended: %d answers sent, %d requests cancelled", sent, len(running))


async def serve_stream(
    requests: AsyncIterable[Request],
    answer: Callable[[Request], Awaitable[tuple[Answer, int]]],
    budget: InflightBudget,
    closing: asyncio.Event,
    context: Any,
) -> AsyncIterator[Answer]:
    """A ModelStreamInfer handler's answers (answer_concurrently): ``answer`` returns the
    message and the bytes of ``budget`` it holds until sent; once ``closing`` is set (the
    stop), the stream ends UNAVAILABLE after the answers to what it read (StreamClosed)."""
    answers = answer_concurrently(
        requests, answer, release=lambda done: budget.release(done[1]), closing=closing
    )
    try:
        async for message, _ in answers:
            yield message
    except StreamClosed as closed:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(closed))
