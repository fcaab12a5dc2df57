"""Load over the Open Inference Protocol: closed loop (fixed concurrency) or open loop (Poisson
arrivals at a target rate, so queueing shows). One pre-serialised ModelInfer request is sent as
raw bytes, so the client spends as little CPU per call as a Python client can.

    python -m benchmarks.loadgen --url 127.0.0.1:8001 --model mlp_onnx --concurrency 16 --seconds 3
    python -m benchmarks.loadgen --url ... --rate 1000 --seconds 3
    python -m benchmarks.loadgen --url ... --concurrency 16 --streaming

``--streaming``: each closed-loop caller sends its calls on one ModelStreamInfer stream of its
own (request, then its answer, then the next request) instead of one unary call each.

Throughput is the successful calls that ended within the measured window, divided by that
window: a call still running at its end counts in the latencies only (a straggler does not
stretch the time the others are divided by). Percentiles are numpy's "linear" method
(interpolated between the two nearest calls) over the calls that succeeded; failed calls are
counted in ``errors`` only. A run where no call succeeded
has NaN percentiles (JSON: null), not zeros, and ``p99_few_samples`` marks a run of fewer than
FEW_FOR_P99 calls, where fewer than ten lie above its p99 (it is little more than the maximum).
The open loop counts latency from each call's scheduled arrival (no coordinated omission), and
reports how late the generator itself sent: ``send_lag_p99_ms``, and ``generator_behind`` when
that exceeds LATE_SEND_MS (the latencies then hold the client's lag too, not only the server's).
Arrivals wake on a timerfd at their exact time (benchmarks/arrivals.py): the event loop's own
timers are about 1 ms coarse, and uvloop's wake early as often as late.

The client's own full garbage collections are held off while it runs (``no_full_collections``):
each walks the client's whole heap with its event loop stopped, 12-25 ms on the dev VM, and
every call in flight then looked that much slower, whichever server answered it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing
import multiprocessing.synchronize
import queue
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal, cast

import grpc
import numpy as np
import uvloop

from benchmarks.arrivals import ArrivalClock
from serve.frontend.pb import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
STREAM_ERROR = 0x0A  # a ModelStreamInferResponse starting with error_message (field 1)
CALL_TIMEOUT_S = 30.0
START_TIMEOUT_S = 120.0  # client processes connecting (spawn, imports, first call)
PERCENTILE_METHOD: Literal["linear"] = "linear"  # numpy's default, named in every result
FEW_FOR_P99 = 1000  # fewer calls: fewer than 10 above the p99
LATE_SEND_MS = 1.0  # open loop: a p99 send lag above this and the generator fell behind
NO_FULL_COLLECTIONS = 1 << 30  # the oldest generation's threshold while a run goes on


@dataclass
class LoadResult:
    mode: str  # "closed" or "open"
    level: float  # concurrency, or arrivals per second
    seconds: float  # the measured window: calls are started (arrive) within it
    count: int  # every successful call (those still running at the window's end too)
    errors: int
    throughput: float  # successful calls that ended within the window, per second of it
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    percentile_method: str = PERCENTILE_METHOD
    p99_few_samples: bool = False
    send_lag_p99_ms: float = 0.0  # open loop: how late the generator sent, at its p99
    generator_behind: bool = False  # open loop: send_lag_p99_ms above LATE_SEND_MS
    completed_in_window: int = 0  # the successful calls that ended within the window

    def summary(self) -> dict[str, float | int | str]:
        data = asdict(self)
        data.pop("latencies_ms")
        return data


def json_safe(value: object) -> object:
    """``value`` with every NaN float (a figure of a run without answers) as None, for JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def request_bytes(model: str, rows: int = 1, width: int = 64, seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, width])
    message.raw_input_contents.append(x.tobytes())
    return cast(bytes, message.SerializeToString())


def _result(
    mode: str,
    level: float,
    seconds: float,
    latencies: list[float],
    errors: int,
    send_lags: list[float] | None = None,
    in_window: int | None = None,
) -> LoadResult:
    """The figures over the successful calls' ``latencies`` (seconds); ``send_lags`` (seconds,
    open loop): how long after its scheduled arrival each call was sent; ``in_window``: how many
    of them ended within the ``seconds`` of the window (default: all), which alone make the
    throughput (a call still running at the window's end is not spread over a longer one)."""
    if in_window is None:
        in_window = len(latencies)
    values = np.asarray(latencies, dtype=np.float64) * 1e3
    if latencies:
        p50, p95, p99 = np.percentile(values, (50, 95, 99), method=PERCENTILE_METHOD)
        top = float(values.max())
    else:  # no call answered: no latency at all, not a latency of 0
        p50 = p95 = p99 = top = math.nan
    lag_p99 = 0.0
    if send_lags:
        lag_p99 = float(np.percentile(np.asarray(send_lags) * 1e3, 99, method=PERCENTILE_METHOD))
    return LoadResult(
        mode,
        level,
        seconds,
        len(latencies),
        errors,
        in_window / seconds if seconds > 0 else 0.0,
        float(p50),
        float(p95),
        float(p99),
        top,
        [float(v) for v in values],
        p99_few_samples=len(latencies) < FEW_FOR_P99,
        send_lag_p99_ms=lag_p99,
        generator_behind=lag_p99 > LATE_SEND_MS,
        completed_in_window=in_window,
    )


async def closed_loop(
    url: str,
    payload: bytes,
    concurrency: int,
    seconds: float,
    connected: Callable[[], object] | None = None,
    connections: int = 1,
    streaming: bool = False,
    window: Callable[[], object] | None = None,
) -> LoadResult:
    """``concurrency`` callers, each sending its next call when the last returns (``streaming``:
    on a ModelStreamInfer stream of its own), spread over
    ``connections`` channels of their own TCP connection (a server whose processes share the
    port with SO_REUSEPORT balances connections, not calls). ``connected`` (if given) is called
    once the channels are up, before the clock starts: client processes wait there for each
    other. ``window`` (if given) is called right before the first measured call and right after
    the last one ends: what the server spends in between is spent on the measured calls (not on
    connecting, its first call or the channels' closing). Each stream's first call (which sets
    the stream up) is made before the window too, as the unary callers' connecting call."""
    latencies: list[float] = []
    errors = in_window = 0
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # no connection shared between them
    channels = [grpc.aio.insecure_channel(url, options=own_connection) for _ in range(connections)]
    stream_timeout = START_TIMEOUT_S + seconds + 2 * CALL_TIMEOUT_S  # (opened before the wait)

    async def open_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
        """A stream with its first call made (not measured); a failure is the streamer's."""
        stream = channel.stream_stream(STREAM_METHOD)(timeout=stream_timeout)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await stream.write(payload)
            await asyncio.wait_for(stream.read(), CALL_TIMEOUT_S)
        return stream

    try:
        calls = [channel.unary_unary(METHOD) for channel in channels]
        for channel, call in zip(channels, calls, strict=True):  # connect first
            if streaming:
                await asyncio.wait_for(channel.channel_ready(), CALL_TIMEOUT_S)
            else:
                await call(payload, timeout=CALL_TIMEOUT_S)
        streams: list[grpc.aio.StreamStreamCall] = []
        if streaming:
            opening = (open_stream(channels[i % connections]) for i in range(concurrency))
            streams = list(await asyncio.gather(*opening))
        if connected is not None:
            connected()
        if window is not None:
            window()
        started = time.perf_counter()
        end = started + seconds

        def answered(start: float) -> None:
            nonlocal in_window
            now = time.perf_counter()
            latencies.append(now - start)
            in_window += now <= end

        async def caller(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
            nonlocal errors
            while time.perf_counter() < end:
                start = time.perf_counter()
                try:
                    await call(payload, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                answered(start)

        async def streamer(channel: grpc.aio.Channel, stream: grpc.aio.StreamStreamCall) -> None:
            """A failed or ended stream counts as one failed call, and the caller goes on on a
            new stream (as a unary caller goes on after a failed call)."""
            nonlocal errors
            method = channel.stream_stream(STREAM_METHOD)
            try:
                while time.perf_counter() < end:
                    start = time.perf_counter()
                    try:
                        await stream.write(payload)
                        answer = await stream.read()
                    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        answer = None  # (it ended with an error, or before this write)
                    if not isinstance(answer, bytes):  # the stream ended
                        errors += 1
                        stream.cancel()
                        stream = method(timeout=seconds + CALL_TIMEOUT_S)
                        continue
                    if answer[:1] == bytes([STREAM_ERROR]):
                        errors += 1
                        continue
                    answered(start)
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await stream.done_writing()
            finally:
                stream.cancel()

        if streaming:
            pairs = [(channels[i % connections], streams[i]) for i in range(concurrency)]
            await asyncio.gather(*(streamer(channel, stream) for channel, stream in pairs))
        else:
            await asyncio.gather(*(caller(calls[i % connections]) for i in range(concurrency)))
        if window is not None:
            window()
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return _result("closed", concurrency, seconds, latencies, errors, in_window=in_window)


async def open_loop(
    url: str,
    payload: bytes,
    rate: float,
    seconds: float,
    seed: int = 0,
    window: Callable[[], object] | None = None,
) -> LoadResult:
    """Arrivals at exponential gaps; latency counts from the scheduled arrival time.
    ``window``: as closed_loop's."""
    latencies: list[float] = []
    send_lags: list[float] = []
    errors = in_window = 0
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(METHOD)
        await call(payload, timeout=CALL_TIMEOUT_S)

        async def one(scheduled: float) -> None:
            nonlocal errors, in_window
            send_lags.append(time.perf_counter() - scheduled)
            try:
                await call(payload, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                errors += 1
                return
            now = time.perf_counter()
            latencies.append(now - scheduled)
            in_window += now <= started + seconds

        tasks: list[asyncio.Task[None]] = []
        with ArrivalClock() as clock:  # (the loop's timers are about 1 ms coarse)
            if window is not None:
                window()
            started = time.perf_counter()
            arrival = started + rng.expovariate(rate)
            while arrival < started + seconds:  # (no arrival scheduled after the window)
                await clock.until(arrival)  # the arrival process itself
                tasks.append(asyncio.create_task(one(arrival)))
                arrival += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        if window is not None:
            window()
    return _result("open", rate, seconds, latencies, errors, send_lags, in_window)


@contextlib.contextmanager
def no_full_collections() -> Iterator[None]:
    """Hold off the client's full (oldest-generation) garbage collections while a run goes on.
    One walks every object the client holds (gRPC, protobuf, numpy, the run's own tasks) with
    the event loop stopped: 12-25 ms on the dev VM, at times set by the client's allocations, and
    every call in flight then waits that long for its answer to be read. In an open loop that
    made the worst episode of a run, the p99 with it (the twenty-fifth session's RESULTS). Young
    collections go on (the calls' short-lived cycles are still freed); what outlives them waits
    for the one full collection made after the run, outside any measured window."""
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, NO_FULL_COLLECTIONS)
    try:
        yield
    finally:
        gc.set_threshold(young, middle, old)
        gc.collect()


def _closed_share(
    url: str,
    payload: bytes,
    concurrency: int,
    seconds: float,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue,  # type: ignore[type-arg]
    connections: int,
    streaming: bool,
) -> None:
    """One client process's share of a closed loop; its result (or error) goes to ``results``."""
    try:
        connected = lambda: barrier.wait(START_TIMEOUT_S)  # noqa: E731
        job = closed_loop(url, payload, concurrency, seconds, connected, connections, streaming)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner, no_full_collections():
            result = runner.run(job)
        results.put(result)
    except BaseException as exc:
        barrier.abort()
        results.put(f"client process failed: {exc!r}")


def closed_loop_processes(
    url: str,
    payload: bytes,
    concurrency: int,
    seconds: float,
    processes: int,
    connections: int = 1,
    streaming: bool = False,
) -> LoadResult:
    """A closed loop split over ``processes`` client processes (each its own channel and
    connection) that start together: one Python client process saturates near a few thousand
    calls/s, below what a server on a large host takes."""
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    shares = [share for share in shares if share]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(shares))
    results = context.Queue()
    children = [
        context.Process(
            target=_closed_share,
            args=(
                url,
                payload,
                share,
                seconds,
                barrier,
                results,
                min(connections, share),
                streaming,
            ),
            name=f"loadgen-{i}",
            daemon=True,
        )
        for i, share in enumerate(shares)
    ]
    for child in children:
        child.start()
    parts: list[LoadResult] = []
    deadline = time.monotonic() + START_TIMEOUT_S + seconds + CALL_TIMEOUT_S
    try:
        while len(parts) < len(children):
            try:
                part = results.get(timeout=1.0)
            except queue.Empty:  # a child that died without a word (killed) ends the run now
                dead = [c for c in children if c.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"client process {dead[0].name} exited with code {dead[0].exitcode} "
                        "before it reported"
                    ) from None
                if time.monotonic() > deadline:
                    missing = len(children) - len(parts)
                    raise RuntimeError(f"{missing} client processes never reported") from None
                continue
            if isinstance(part, str):
                raise RuntimeError(part)
            parts.append(part)
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    latencies = [ms / 1e3 for part in parts for ms in part.latencies_ms]
    errors = sum(p.errors for p in parts)
    in_window = sum(p.completed_in_window for p in parts)
    return _result("closed", concurrency, seconds, latencies, errors, in_window=in_window)


def run(
    url: str,
    model: str,
    *,
    concurrency: int = 0,
    rate: float = 0,
    seconds: float = 3.0,
    payload: bytes = b"",
    processes: int = 1,
    connections: int = 1,
    streaming: bool = False,
    window: Callable[[], object] | None = None,
) -> LoadResult:
    """Closed loop at ``concurrency`` or open loop at ``rate``; ``payload`` is a serialised
    ModelInferRequest (default: one row for the demo MLP). A closed loop can be split over
    ``processes`` client processes, each with ``connections`` connections, and its calls sent
    on streams (``streaming``). ``window``: called where the measured calls start and end (one
    client process only)."""
    payload = payload or request_bytes(model)
    if rate and streaming:
        raise ValueError("streaming is a closed-loop mode")
    if window is not None and processes > 1 and not rate:
        raise ValueError("window marks need the calls in this process (processes=1)")
    if processes > 1 and not rate:
        return closed_loop_processes(
            url, payload, concurrency, seconds, processes, connections, streaming
        )
    if rate:
        job = open_loop(url, payload, rate, seconds, window=window)
    else:
        job = closed_loop(
            url,
            payload,
            concurrency,
            seconds,
            connections=connections,
            streaming=streaming,
            window=window,
        )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner, no_full_collections():
        return runner.run(job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="mlp_onnx")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: arrivals per second")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--processes", type=int, default=1, help="client processes (closed loop)")
    parser.add_argument(
        "--connections", type=int, default=1, help="connections per client process (closed loop)"
    )
    parser.add_argument(
        "--streaming", action="store_true", help="closed loop: each caller on a stream of its own"
    )
    args = parser.parse_args()
    result = run(
        args.url,
        args.model,
        concurrency=args.concurrency,
        rate=args.rate,
        seconds=args.seconds,
        processes=args.processes,
        connections=args.connections,
        streaming=args.streaming,
    )
    print(json.dumps(json_safe(result.summary())))


if __name__ == "__main__":
    main()
