"""A handler run as grpc.aio runs a call's handler: in a task of its own that ends once the
answer has been sent (or at once when the handler fails), which is when the server gives an
answer's share of the in-flight budget back (admission.release_once_sent)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


class GrpcCallTask:
    def __init__(self) -> None:
        self._sent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, handler: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run ``handler`` in the call's task; the future of what it returns (or raises)."""
        answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def call() -> None:
            try:
                answer = await handler
            except BaseException as exc:  # (gRPC sends the error's status and ends the call)
                answered.set_exception(exc)
                return
            answered.set_result(answer)
            await self._sent.wait()  # gRPC writes the answer, as far as its client reads it

        self._task = asyncio.ensure_future(call())
        return answered

    async def sent(self) -> None:
        """The client has read the answer: the call's task ends (its done callbacks run before
        this returns: they were added before the one that resumes this coroutine)."""
        assert self._task is not None
        self._sent.set()
        await self._task
