"""Load over the Open Inference Protocol: closed loop (fixed concurrency) or open loop (Poisson
arrivals at a target rate, so queueing shows). One pre-serialised ModelInfer request is sent as
raw bytes, so the client spends as little CPU per call as a Python client can.

    python -m benchmarks.loadgen --url 127.0.0.1:8001 --model mlp_onnx --concurrency 16 --seconds 3
    python -m benchmarks.loadgen --url ... --rate 1000 --seconds 3
    python -m benchmarks.loadgen --url ... --concurrency 16 --streaming

``--streaming``: each closed-loop caller sends its calls on one ModelStreamInfer stream of its
own (request, then its answer, then the next request) instead of one unary call each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.synchronize
import queue
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import cast

import grpc
import numpy as np
import uvloop

from serve.frontend.pb import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
STREAM_ERROR = 0x0A  # a ModelStreamInferResponse starting with error_message (field 1)
CALL_TIMEOUT_S = 30.0
START_TIMEOUT_S = 120.0  # client processes connecting (spawn, imports, first call)


@dataclass
class LoadResult:
    mode: str  # "closed" or "open"
    level: float  # concurrency, or arrivals per second
    seconds: float
    count: int
    errors: int
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, float | int | str]:
        data = asdict(self)
        data.pop("latencies_ms")
        return data


def request_bytes(model: str, rows: int = 1, width: int = 64, seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, width])
    message.raw_input_contents.append(x.tobytes())
    return cast(bytes, message.SerializeToString())


def _result(
    mode: str, level: float, seconds: float, latencies: list[float], errors: int
) -> LoadResult:
    values = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    p50, p95, p99 = np.percentile(values, (50, 95, 99))
    return LoadResult(
        mode,
        level,
        seconds,
        len(latencies),
        errors,
        len(latencies) / seconds,
        float(p50),
        float(p95),
        float(p99),
        float(values.max()),
        [float(v) for v in values] if latencies else [],  # (no call answered: none, not a 0)
    )


async def closed_loop(
    url: str,
    payload: bytes,
    concurrency: int,
    seconds: float,
    connected: Callable[[], object] | None = None,
    connections: int = 1,
    streaming: bool = False,
) -> LoadResult:
    """``concurrency`` callers, each sending its next call when the last returns (``streaming``:
    on a ModelStreamInfer stream of its own), spread over
    ``connections`` channels of their own TCP connection (a server whose processes share the
    port with SO_REUSEPORT balances connections, not calls). ``connected`` (if given) is called
    once the channels are up, before the clock starts: client processes wait there for each
    other."""
    latencies: list[float] = []
    errors = 0
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # no connection shared between them
    channels = [grpc.aio.insecure_channel(url, options=own_connection) for _ in range(connections)]
    try:
        calls = [channel.unary_unary(METHOD) for channel in channels]
        for channel, call in zip(channels, calls, strict=True):  # connect first
            if streaming:
                await asyncio.wait_for(channel.channel_ready(), CALL_TIMEOUT_S)
            else:
                await call(payload, timeout=CALL_TIMEOUT_S)
        if connected is not None:
            connected()
        end = time.perf_counter() + seconds

        async def caller(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
            nonlocal errors
            while time.perf_counter() < end:
                start = time.perf_counter()
                try:
                    await call(payload, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        async def streamer(channel: grpc.aio.Channel) -> None:
            nonlocal errors
            stream = channel.stream_stream(STREAM_METHOD)(timeout=seconds + CALL_TIMEOUT_S)
            try:
                while time.perf_counter() < end:
                    start = time.perf_counter()
                    await stream.write(payload)
                    answer = await stream.read()
                    if not isinstance(answer, bytes):  # the stream ended (its status says why)
                        raise RuntimeError(f"stream ended: {await stream.code()}")
                    if answer[:1] == bytes([STREAM_ERROR]):
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - start)
                await stream.done_writing()
            finally:
                stream.cancel()

        started = time.perf_counter()
        if streaming:
            await asyncio.gather(*(streamer(channels[i % connections]) for i in range(concurrency)))
        else:
            await asyncio.gather(*(caller(calls[i % connections]) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return _result("closed", concurrency, elapsed, latencies, errors)


async def open_loop(
    url: str, payload: bytes, rate: float, seconds: float, seed: int = 0
) -> LoadResult:
    """Arrivals at exponential gaps; latency counts from the scheduled arrival time."""
    latencies: list[float] = []
    errors = 0
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(METHOD)
        await call(payload, timeout=CALL_TIMEOUT_S)

        async def one(scheduled: float) -> None:
            nonlocal errors
            try:
                await call(payload, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                errors += 1
                return
            latencies.append(time.perf_counter() - scheduled)

        tasks: list[asyncio.Task[None]] = []
        started = time.perf_counter()
        arrival = started
        while arrival < started + seconds:
            arrival += rng.expovariate(rate)
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival process itself
            tasks.append(asyncio.create_task(one(arrival)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return _result("open", rate, elapsed, latencies, errors)


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
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results.put(runner.run(job))
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
    elapsed = max(part.seconds for part in parts)
    return _result("closed", concurrency, elapsed, latencies, sum(p.errors for p in parts))


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
) -> LoadResult:
    """Closed loop at ``concurrency`` or open loop at ``rate``; ``payload`` is a serialised
    ModelInferRequest (default: one row for the demo MLP). A closed loop can be split over
    ``processes`` client processes, each with ``connections`` connections, and its calls sent
    on streams (``streaming``)."""
    payload = payload or request_bytes(model)
    if rate and streaming:
        raise ValueError("streaming is a closed-loop mode")
    if processes > 1 and not rate:
        return closed_loop_processes(
            url, payload, concurrency, seconds, processes, connections, streaming
        )
    if rate:
        job = open_loop(url, payload, rate, seconds)
    else:
        job = closed_loop(
            url, payload, concurrency, seconds, connections=connections, streaming=streaming
        )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
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
    print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()
