"""The load generator's figures from synthetic samples: percentiles over the calls that
succeeded only, no made-up zeros for a run without answers, a p99 of few calls flagged, and an
open loop whose generator fell behind its schedule marked as such."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from benchmarks import loadgen
from benchmarks.rounds import median_row


def test_percentiles_are_over_the_successful_calls_with_the_method_named():
    latencies = [i / 1e3 for i in range(1, 2001)]  # 1..2000 ms
    result = loadgen._result("closed", 4, 2.0, latencies, errors=7)
    expected = np.percentile(np.arange(1, 2001, dtype=float), (50, 95, 99), method="linear")
    assert (result.p50_ms, result.p95_ms, result.p99_ms) == tuple(float(v) for v in expected)
    assert result.max_ms == 2000.0
    assert (result.count, result.errors, result.throughput) == (2000, 7, 1000.0)
    assert result.summary()["percentile_method"] == "linear"
    assert result.summary()["p99_few_samples"] is False


def test_a_run_where_no_call_succeeded_has_no_latency_rather_than_a_latency_of_zero():
    result = loadgen._result("closed", 16, 1.0, [], errors=250)
    assert result.count == 0 and result.errors == 250 and result.throughput == 0
    for figure in (result.p50_ms, result.p95_ms, result.p99_ms, result.max_ms):
        assert math.isnan(figure)
    assert result.latencies_ms == []
    # in JSON: null (NaN is not JSON)
    record = json.loads(json.dumps(loadgen.json_safe(result.summary()), allow_nan=False))
    assert record["p50_ms"] is None and record["errors"] == 250


def test_a_p99_over_few_calls_is_flagged():
    few = loadgen._result("closed", 1, 1.0, [0.001] * 50 + [0.5], errors=0)
    assert few.p99_few_samples is True
    many = loadgen._result("closed", 1, 1.0, [0.001] * loadgen.FEW_FOR_P99, errors=0)
    assert many.p99_few_samples is False


def test_an_open_loop_whose_sends_ran_late_says_the_generator_fell_behind():
    latencies = [0.002] * 1000
    on_time = loadgen._result("open", 500, 2.0, latencies, 0, send_lags=[0.0001] * 1000)
    assert on_time.generator_behind is False and on_time.send_lag_p99_ms < 1
    lags = [0.0001] * 950 + [0.02] * 50  # 5 % of the calls sent 20 ms after their arrival
    late = loadgen._result("open", 5000, 2.0, latencies, 0, send_lags=lags)
    assert late.generator_behind is True and late.send_lag_p99_ms == 20.0


def test_rounds_keep_a_flag_raised_in_any_round_and_ignore_a_round_without_answers():
    answered = loadgen._result("closed", 1, 1.0, [0.001] * 2000 + [0.009], 0).summary()
    none = loadgen._result("closed", 1, 1.0, [], 5).summary()
    combined = median_row([answered, answered, none])
    assert combined["p99_few_samples"] is True  # the round without answers had none at all
    assert combined["max_ms"] == 9.0
    assert combined["errors"] == 5


class CountingServer:
    """A grpc.aio server on 127.0.0.1 whose ModelInfer answers empty bytes and counts calls."""

    def __init__(self, slow_call: int = 0, slow_s: float = 0.0) -> None:
        self.calls = 0
        self.streams_ended = 0
        self.slow_call, self.slow_s = slow_call, slow_s  # the slow_call-th call takes slow_s

    async def __aenter__(self) -> str:
        import grpc

        async def infer(request: bytes, context: object) -> bytes:
            self.calls += 1
            if self.calls == self.slow_call:
                await asyncio.sleep(self.slow_s)  # (a slow call, not a synchronisation)
            return b""

        async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            """Answers two requests, then ends the stream with UNAVAILABLE (a relay gone)."""
            answered = 0
            async for _ in requests:
                self.calls += 1  # (every request, answered or not)
                if answered == 2:
                    self.streams_ended += 1
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "relay gone")
                answered += 1
                yield b""

        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),  # raw bytes in and out
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream),
        }
        service = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((service,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(None)


def record(marks: list[int], server: CountingServer) -> None:
    marks.append(server.calls)


def test_the_window_marks_enclose_exactly_the_measured_calls():
    """What the server spends between the marks (make bench's CPU per call) is spent on the
    calls counted, not on connecting or the first call."""

    async def main() -> None:
        server = CountingServer()
        async with server as url:
            for job, first_calls in (
                (lambda mark: loadgen.closed_loop(url, b"", 2, 0.2, window=mark), 1),
                (lambda mark: loadgen.open_loop(url, b"", 200, 0.2, window=mark), 1),
                (  # each stream's first call, which sets the stream up
                    lambda mark: loadgen.closed_loop(url, b"", 3, 0.2, streaming=True, window=mark),
                    3,
                ),
            ):
                before = server.calls
                at_marks: list[int] = []
                result = await job(functools.partial(record, at_marks, server))
                assert at_marks[0] == before + first_calls  # only those before the window
                assert at_marks[1] - at_marks[0] == result.count + result.errors
                assert result.count > 0 and server.calls == at_marks[1]

    asyncio.run(main())


def test_a_stream_that_the_server_ends_counts_as_a_failed_call_and_the_caller_goes_on():
    async def main() -> None:
        server = CountingServer()
        async with server as url:
            result = await loadgen.closed_loop(url, b"", 2, 0.3, streaming=True)
        assert server.streams_ended >= 2
        assert result.errors == server.streams_ended
        assert result.count + result.errors == server.calls - 2  # (2: the streams' first calls)
        assert result.count > 2 * 2

    asyncio.run(main())


def test_throughput_counts_the_calls_that_ended_within_the_window_over_the_window():
    """A call still running when the window ends is in the latencies, but neither in the
    throughput nor stretching the window it is divided by."""

    async def main() -> None:
        for job in (
            lambda url: loadgen.closed_loop(url, b"", 2, 0.2),
            lambda url: loadgen.open_loop(url, b"", 100, 0.2),
        ):
            # the third call (the first measured ones: 1 connects) outlasts the 0.2 s window
            async with CountingServer(slow_call=3, slow_s=0.5) as url:
                result = await job(url)
            assert result.seconds == 0.2
            assert max(result.latencies_ms) >= 500
            assert result.completed_in_window < result.count
            assert result.throughput == result.completed_in_window / 0.2

    asyncio.run(main())


def test_throughput_is_the_calls_within_the_window_over_it():
    result = loadgen._result("closed", 4, 2.0, [0.001] * 1000, 0, in_window=900)
    assert (result.count, result.completed_in_window, result.throughput) == (1000, 900, 450.0)


def _full_collections_while(allocate) -> int:  # type: ignore[no-untyped-def]
    """How many full (oldest-generation) collections ran during ``allocate()``."""
    import gc

    full: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    gc.callbacks.append(seen)
    try:
        allocate()
    finally:
        gc.callbacks.remove(seen)
    return len(full)


def _objects_that_live_on() -> None:
    """Enough container objects that outlive young collections to set off full ones."""
    kept = [[i] for i in range(300_000)]
    assert len(kept) == 300_000


def test_a_run_holds_off_the_clients_full_garbage_collections_and_makes_one_after():
    import gc

    thresholds = gc.get_threshold()
    assert _full_collections_while(_objects_that_live_on) > 0  # what a run would otherwise get

    def inside_a_run() -> None:
        with loadgen.no_full_collections():
            assert gc.get_threshold()[:2] == thresholds[:2]  # young collections go on
            assert _full_collections_while(_objects_that_live_on) == 0

    assert _full_collections_while(inside_a_run) == 1  # the one after the run
    assert gc.get_threshold() == thresholds
