"""A relay's handler of a unary call (Forwarder) against a fake hub link and gRPC context."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from serve.frontend.relay import Forwarder
from serve.frontend.relay_wire import MODEL_INFER, RelayReply

DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


class _Link:
    def __init__(self, reply: RelayReply) -> None:
        self.reply = reply

    async def call(self, method: str, payload: bytes, timeout_s: float | None) -> RelayReply:
        return self.reply


class _Aborted(Exception):
    pass


class _Context:
    """A call whose deadline has ``remaining`` seconds left once the hub answered."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.aborted: tuple[grpc.StatusCode, str] | None = None

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
