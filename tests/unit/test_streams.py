"""answer_concurrently: a stream's requests are answered at once and side by side, each answer
goes back as it completes, no more than the limit run at a time, and a failure of the stream (or
the caller going away) cancels what is still running. No sleeps: answers wait on events the
test sets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.relay_wire import stream_answer, stream_error
from serve.frontend.streams import StreamClosed, answer_concurrently


async def _requests(items: list[int]) -> AsyncIterator[int]:
    for item in items:
        yield item


class Gates:
    """An event per request: its answer returns once the test opens it."""

    def __init__(self, count: int) -> None:
        self.open = [asyncio.Event() for _ in range(count)]
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.running = 0
        self.most_running = 0

    async def answer(self, request: int) -> str:
        self.started.append(request)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.open[request].wait()
        except asyncio.CancelledError:
            self.cancelled.append(request)
            raise
        finally:
            self.running -= 1
        if request == 99:
            raise RuntimeError("unreachable")
        return f"answer {request}"


def test_answers_come_back_in_the_order_they_complete():
    async def main() -> list[str]:
        gates = Gates(3)
        stream = answer_concurrently(_requests([0, 1, 2]), gates.answer)
        got = []
        first = asyncio.ensure_future(anext(stream))
        while len(gates.started) < 3:  # all three start without waiting for each other
            await asyncio.sleep(0)
        gates.open[2].set()
        got.append(await first)
        gates.open[0].set()
        got.append(await anext(stream))
        gates.open[1].set()
        got += [answer async for answer in stream]
        return got

    assert asyncio.run(main()) == ["answer 2", "answer 0", "answer 1"]


def test_no_more_than_the_limit_run_at_once():
    async def main() -> Gates:
        gates = Gates(5)
        stream = answer_concurrently(_requests([0, 1, 2, 3, 4]), gates.answer, limit=2)
        pending = asyncio.ensure_future(anext(stream))
        for index in range(5):
            while len(gates.started) < min(index + 2, 5):
                await asyncio.sleep(0)
            assert gates.running <= 2
            gates.open[index].set()
            assert await pending == f"answer {index}"
            pending = asyncio.ensure_future(anext(stream))
        with pytest.raises(StopAsyncIteration):
            await pending
        return gates

    gates = asyncio.run(main())
    assert gates.most_running == 2


def test_an_answer_that_raises_ends_the_stream_and_cancels_the_rest():
    async def main() -> list[int]:
        gates = Gates(100)
        stream = answer_concurrently(_requests([0, 99]), gates.answer)
        failing = asyncio.ensure_future(anext(stream))
        while len(gates.started) < 2:
            await asyncio.sleep(0)
        gates.open[99].set()
        with pytest.raises(RuntimeError, match="unreachable"):
            await failing
        for _ in range(3):  # let the cancellations land
            await asyncio.sleep(0)
        return list(gates.cancelled)  # (asyncio.run would cancel what is left on its own)

    assert asyncio.run(main()) == [0]


def test_closing_the_stream_cancels_the_answers_still_running():
    async def main() -> list[int]:
        gates = Gates(2)
        stream = answer_concurrently(_requests([0, 1]), gates.answer)
        gates.open[1].set()
        assert await anext(stream) == "answer 1"
        await stream.aclose()  # the caller went away
        for _ in range(3):
            await asyncio.sleep(0)
        return list(gates.cancelled)  # (asyncio.run would cancel what is left on its own)

    assert asyncio.run(main()) == [0]


def test_an_error_reading_the_requests_ends_the_stream_after_the_answers_so_far():
    async def broken() -> AsyncIterator[int]:
        yield 0
        raise ConnectionError("stream reset")

    async def main() -> list[str]:
        gates = Gates(1)
        gates.open[0].set()
        got = []
        with pytest.raises(ConnectionError, match="stream reset"):
            async for answer in answer_concurrently(broken(), gates.answer):
                got.append(answer)
        return got

    assert asyncio.run(main()) in ([], ["answer 0"])  # the error may overtake the answer


@pytest.mark.parametrize("size", [0, 5, 127, 128, 20_000, 3_000_000])
def test_the_relays_stream_messages_parse_as_the_protocols(size):
    inner = pb.ModelInferResponse(model_name="m", id="x")
    inner.raw_output_contents.append(bytes(size))
    answer = pb.ModelStreamInferResponse.FromString(stream_answer(inner.SerializeToString()))
    assert answer.error_message == ""
    assert answer.infer_response.parameters["triton_final_response"].bool_param
    inner.parameters["triton_final_response"].bool_param = True
    assert answer.infer_response == inner
    final = pb.ModelInferResponse()
    final.parameters["triton_final_response"].bool_param = True
    message = "é" * size if size < 100_000 else "x" * size
    error = pb.ModelStreamInferResponse.FromString(stream_error(message))
    assert error.error_message == message and error.infer_response == final
    request_id = "r" * size if size < 100_000 else "r"
    error = pb.ModelStreamInferResponse.FromString(stream_error(message, request_id))
    final.id = request_id
    assert error.error_message == message and error.infer_response == final


def test_answers_not_yet_taken_count_against_the_limit():
    pulled = 0

    async def endless() -> AsyncIterator[int]:
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled

    async def answer(request: int) -> int:
        return request

    async def main() -> int:
        stream = answer_concurrently(endless(), answer, limit=3)
        assert await anext(stream) == 1  # the caller takes one answer and no more
        for _ in range(50):  # the requests read meanwhile stop at the limit
            await asyncio.sleep(0)
        read = pulled
        await stream.aclose()
        return read

    assert asyncio.run(main()) <= 4  # 3 in flight or unsent, and the one being read


class Ledger:
    """Answers that hold a share of a budget: what each took and what came back, by answer."""

    def __init__(self) -> None:
        self.taken: list[str] = []
        self.released: list[str] = []

    async def answer(self, request: int) -> str:
        await asyncio.sleep(0)  # (a turn of the loop, as a computed answer takes)
        if request < 0:
            raise RuntimeError("the stream breaks")
        self.taken.append(f"answer {request}")
        return f"answer {request}"

    def release(self, answer: str) -> None:
        self.released.append(answer)


def test_each_answer_is_released_once_after_it_was_sent():
    ledger = Ledger()

    async def main() -> list[tuple[str, list[str]]]:
        seen = []
        stream = answer_concurrently(_requests([0, 1, 2]), ledger.answer, release=ledger.release)
        async for answer in stream:
            seen.append((answer, list(ledger.released)))  # not released while in hand
        return seen

    seen = asyncio.run(main())
    for answer, released_then in seen:
        assert answer not in released_then
    assert sorted(ledger.released) == sorted(ledger.taken) == ["answer 0", "answer 1", "answer 2"]


def test_answers_unsent_when_the_caller_goes_away_are_released_once():
    ledger = Ledger()

    async def main() -> None:
        stream = answer_concurrently(
            _requests(list(range(8))), ledger.answer, release=ledger.release
        )
        first = await anext(stream)  # in hand; the others complete and wait, unsent
        while len(ledger.taken) < 8:
            await asyncio.sleep(0)
        assert first == "answer 0" and ledger.released == []
        await stream.aclose()  # the caller went away

    asyncio.run(main())
    assert len(ledger.taken) == 8
    assert sorted(ledger.released) == sorted(ledger.taken)  # each once, none twice


def test_answers_unsent_when_the_stream_breaks_are_released_once():
    ledger = Ledger()

    async def main() -> None:
        stream = answer_concurrently(
            _requests([0, 1, -1, 2]), ledger.answer, release=ledger.release
        )
        with pytest.raises(RuntimeError, match="the stream breaks"):
            async for _ in stream:
                pass

    asyncio.run(main())
    assert sorted(ledger.released) == sorted(ledger.taken)


class OpenStream:
    """A client's stream that stays open: its requests as the test sends them, never an end
    unless the test half-closes it; records how many were read."""

    def __init__(self) -> None:
        self._items: asyncio.Queue[int | None] = asyncio.Queue()
        self.read = 0

    def send(self, *items: int | None) -> None:
        for item in items:
            self._items.put_nowait(item)

    async def requests(self) -> AsyncIterator[int]:
        while (item := await self._items.get()) is not None:
            self.read += 1
            yield item


def test_a_closed_stream_answers_what_it_read_then_ends_stream_closed_reading_no_more():
    async def main() -> tuple[list[str], OpenStream, Gates]:
        gates, client, closing = Gates(4), OpenStream(), asyncio.Event()
        stream = answer_concurrently(client.requests(), gates.answer, closing=closing)
        client.send(0, 1)
        first = asyncio.ensure_future(anext(stream))
        while len(gates.started) < 2:
            await asyncio.sleep(0)
        gates.open[0].set()
        got = [await first]
        closing.set()  # the server stops with request 1 in flight
        client.send(2, 3)  # sent, never read
        gates.open[1].set()
        got.append(await anext(stream))  # the one in flight is still answered
        with pytest.raises(StreamClosed, match="send any request that got no answer again"):
            await anext(stream)
        return got, client, gates

    got, client, gates = asyncio.run(main())
    assert got == ["answer 0", "answer 1"]
    assert client.read == 2 and gates.started == [0, 1] and gates.cancelled == []


def test_a_stream_whose_requests_ended_ends_as_usual_when_closed():
    async def main() -> list[str]:
        gates, closing = Gates(1), asyncio.Event()
        stream = answer_concurrently(_requests([0]), gates.answer, closing=closing)
        pending = asyncio.ensure_future(anext(stream))
        while not gates.started:  # (read, and the requests' end read with it)
            await asyncio.sleep(0)
        closing.set()  # the client had half-closed: nothing is left unread
        gates.open[0].set()
        return [await pending] + [answer async for answer in stream]  # no StreamClosed

    assert asyncio.run(main()) == ["answer 0"]


def test_a_stream_closed_while_waiting_for_room_reads_nothing_more():
    """At the limit the reader waits for room before it reads: closing then loses no request
    it read (the third stays unread, with its caller)."""

    async def main() -> tuple[list[str], OpenStream]:
        gates, client, closing = Gates(3), OpenStream(), asyncio.Event()
        stream = answer_concurrently(client.requests(), gates.answer, limit=2, closing=closing)
        client.send(0, 1, 2)
        pending = asyncio.ensure_future(anext(stream))
        while len(gates.started) < 2:
            await asyncio.sleep(0)
        closing.set()
        gates.open[0].set()
        gates.open[1].set()
        got = [await pending, await anext(stream)]
        with pytest.raises(StreamClosed):
            await anext(stream)
        return got, client

    got, client = asyncio.run(main())
    assert sorted(got) == ["answer 0", "answer 1"]
    assert client.read == 2
