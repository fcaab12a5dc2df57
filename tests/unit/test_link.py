"""The parent's end of a worker's channel over a real socket pair, on both event loops the server
runs on: what a message handler that raises, and a corrupt frame, do to the link."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import pytest
import uvloop

from serve.pool.link import WorkerLink
from serve.pool.messages import FRAME_HEADER, BatchFailed, FromWorker, Shutdown, frame

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
WAIT_S = 10.0  # only bounds a failing test; a passing one never waits for it


class Recorder:
    """on_message / on_lost for a link: records, raises for the batch ids in ``poison``."""

    def __init__(self, poison: set[int]) -> None:
        self.poison = poison
        self.got: list[int] = []
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.seen: dict[int, asyncio.Future[None]] = {}

    def arrived(self, batch_id: int) -> asyncio.Future[None]:
        return self.seen.setdefault(batch_id, asyncio.get_running_loop().create_future())

    def on_message(self, message: FromWorker) -> None:
        assert isinstance(message, BatchFailed)
        self.got.append(message.batch_id)
        self.arrived(message.batch_id).set_result(None)
        if message.batch_id in self.poison:
            raise RuntimeError(f"bug while handling batch {message.batch_id}")

    def on_lost(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)


async def _first(*futures: asyncio.Future[object]) -> None:
    await asyncio.wait(futures, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)


async def _linked(recorder: Recorder) -> tuple[WorkerLink, socket.socket]:
    ours, theirs = socket.socketpair()
    _, link = await asyncio.get_running_loop().connect_accepted_socket(
        lambda: WorkerLink(recorder.on_message, recorder.on_lost, "m#3"), sock=ours
    )
    theirs.setblocking(False)
    return link, theirs


@pytest.mark.parametrize("loop", LOOPS)
def test_a_handler_that_raises_costs_that_message_and_the_link_goes_on(loop, caplog):
    async def main() -> tuple[Recorder, bytes, str]:
        recorder = Recorder(poison={1})
        link, worker_end = await _linked(recorder)
        try:
            # one at a time (the one-message fast path), then two in one read
            await asyncio.get_running_loop().sock_sendall(
                worker_end, frame(BatchFailed(1, "execution", "boom"))
            )
            await _first(recorder.arrived(1), recorder.lost)
            await asyncio.get_running_loop().sock_sendall(
                worker_end,
                frame(BatchFailed(2, "execution", "a")) + frame(BatchFailed(3, "execution", "b")),
            )
            await _first(recorder.arrived(3), recorder.lost)
            link.send(Shutdown("still there?"))  # the channel still carries the parent's side
            expected = len(frame(Shutdown("still there?")))
            async with asyncio.timeout(WAIT_S):
                echoed = await asyncio.get_running_loop().sock_recv(worker_end, expected)
            return recorder, echoed, recorder.lost.result() if recorder.lost.done() else ""
        finally:
            link.close()
            worker_end.close()

    with (
        caplog.at_level(logging.ERROR, logger="serve.pool.link"),
        asyncio.Runner(loop_factory=LOOPS[loop]) as runner,
    ):
        recorder, echoed, lost = runner.run(main())
    assert not lost, f"the link closed: {lost}"
    assert recorder.got == [1, 2, 3]
    assert echoed == frame(Shutdown("still there?"))
    (record,) = [r for r in caplog.records if r.name == "serve.pool.link"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "m#3" in record.getMessage() and "BatchFailed for batch 1" in record.getMessage()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_corrupt_frame_closes_the_channel_loudly_after_the_answers_before_it(loop, caplog):
    async def main() -> tuple[Recorder, str]:
        recorder = Recorder(poison=set())
        link, worker_end = await _linked(recorder)
        garbage = b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
        try:
            await asyncio.get_running_loop().sock_sendall(
                worker_end,
                frame(BatchFailed(1, "execution", "x")) + FRAME_HEADER.pack(len(garbage)) + garbage,
            )
            async with asyncio.timeout(WAIT_S):
                reason = await recorder.lost
            return recorder, reason
        finally:
            link.close()
            worker_end.close()

    with (
        caplog.at_level(logging.ERROR, logger="serve.pool.link"),
        asyncio.Runner(loop_factory=LOOPS[loop]) as runner,
    ):
        recorder, reason = runner.run(main())
    assert recorder.got == [1]  # the whole answer before the corrupt frame still counts
    assert "protocol error: undecodable message" in reason  # the pool's log says why
    assert any("m#3" in r.getMessage() and "undecodable" in r.getMessage() for r in caplog.records)
