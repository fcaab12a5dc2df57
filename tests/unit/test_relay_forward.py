"""A relay's handler of a unary call (Forwarder) against a fake hub link and gRPC context."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from serve.frontend.admission import RELAYED_ANSWER_COPIES, InflightBudget
from serve.frontend.relay import Forwarder
from serve.frontend.relay_wire import MODEL_INFER, RelayReply, stream_answer
from tests.unit.grpc_call import GrpcCallTask

DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


class _Link:
    def __init__(self, reply: RelayReply) -> None:
        self.reply = reply
        self.calls = 0

    async def call(self, method: str, payload: bytes, timeout_s: float | None) -> RelayReply:
        self.calls += 1
        return self.reply


class _Aborted(Exception):
    pass


class _Context:
    """A call whose deadline has ``remaining`` seconds left once the hub answered."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.call = GrpcCallTask()

    def add_done_callback(self, callback: Any) -> None:
        # grpc.aio keeps these bound to the context after they ran: a reference cycle per call
        raise AssertionError("the answer's budget is released by the call's task, not this")

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted


def _forward(reply: RelayReply, context: _Context) -> bytes:
    forwarder = Forwarder(_Link(reply))  # type: ignore[arg-type]
    return asyncio.run(forwarder._forward(MODEL_INFER, b"request", context))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "reply",
    [RelayReply(1, 0, "", b"answer"), RelayReply(1, DEADLINE_EXCEEDED, "expired", b"")],
)
def test_an_answer_that_comes_after_the_deadline_is_not_sent(reply):
    # gRPC has ended the call: sending fails in its core, which logs an ERROR and a traceback
    # for each such call; the handler ends as gRPC's own cancellation ends it
    context = _Context(remaining=0.0)
    with pytest.raises(asyncio.CancelledError):
        _forward(reply, context)
    assert context.aborted is None


def test_an_answer_within_the_deadline_or_without_one_is_sent():
    assert _forward(RelayReply(1, 0, "", b"answer"), _Context(remaining=0.5)) == b"answer"
    assert _forward(RelayReply(1, 0, "", b"answer"), _Context(remaining=None)) == b"answer"
    context = _Context(remaining=0.5)
    with pytest.raises(_Aborted):
        _forward(RelayReply(1, DEADLINE_EXCEEDED, "expired while queued", b""), context)
    assert context.aborted == (grpc.StatusCode.DEADLINE_EXCEEDED, "expired while queued")


def test_answers_its_callers_have_not_read_hold_the_relays_budget_until_sent():
    # gRPC keeps an answer its client does not read in the relay: without a budget, callers
    # that never read took a relay to gigabytes
    async def main() -> None:
        link = _Link(RelayReply(1, 0, "", bytes(100)))
        budget = InflightBudget(250 * RELAYED_ANSWER_COPIES)
        forwarder = Forwarder(link, budget)  # type: ignore[arg-type]
        unread = [_Context(remaining=None) for _ in range(3)]
        for context in unread:  # taken while the unsent answers hold less than the limit
            handler = forwarder._forward(MODEL_INFER, b"request", context)  # type: ignore[arg-type]
            assert await context.call.start(handler) == bytes(100)
        assert budget.held == 300 * RELAYED_ANSWER_COPIES
        refused = _Context(remaining=None)
        with pytest.raises(_Aborted):
            await forwarder._forward(MODEL_INFER, b"request", refused)  # type: ignore[arg-type]
        assert refused.aborted is not None
        assert refused.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "unsent answers" in refused.aborted[1]
        assert link.calls == 3, "a refused call is not passed on"
        for context in unread:
            await context.call.sent()
        assert budget.held == 0
        answer = await forwarder._forward(MODEL_INFER, b"request", _Context(None))  # type: ignore[arg-type]
        assert answer == bytes(100)

    asyncio.run(main())


def test_answers_a_stream_has_not_sent_hold_the_relays_budget_and_refuse_its_next_requests():
    async def requests(count: int):
        for _ in range(count):
            yield b"request"

    async def main() -> None:
        link = _Link(RelayReply(1, 0, "", bytes(100)))
        answer_size = len(stream_answer(bytes(100)))  # the hub's answer, as the stream sends it
        # room for two unsent answers; a third request is refused while they hold it all
        budget = InflightBudget(2 * answer_size * RELAYED_ANSWER_COPIES)
        forwarder = Forwarder(link, budget)  # type: ignore[arg-type]
        stream = forwarder._forward_infer_stream(requests(4), _Context(None))  # type: ignore[arg-type]
        # (the fake hub answers at once: the requests are answered one after another)
        first = await anext(stream)  # in hand, unsent, as the one behind it
        assert budget.held == 2 * answer_size * RELAYED_ANSWER_COPIES
        rest = [await anext(stream) for _ in range(3)]
        refused = [m for m in [first, *rest] if b"unsent answers" in m]
        assert len(refused) == 2 and link.calls == 2  # refused ones never reach the hub
        await stream.aclose()
        assert budget.held == 0  # every answer gave its share back once sent

    asyncio.run(main())
