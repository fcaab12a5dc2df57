"""Throwaway: every answered call carries its own rows, under batching and churn.

Unary callers and streams (c=48 in all, 1-8 rows a call, distinct inputs) against the MLP,
with a share of calls cancelled mid-flight or given deadlines too short to meet, so that
batches form, break up and are abandoned. Every OK answer is compared with the reference MLP of
its own inputs. Run direct and through 2 relays (the ring path for large calls: 300 rows).

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-29-twentyseventh/crosstalk.py SECONDS
"""

from __future__ import annotations

import asyncio
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.compare import batch_rows
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import build_mlp_onnx, mlp_reference
from tests.integration.harness import ServerProcess, wait_until

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def request(rng: random.Random, tag: int) -> tuple[bytes, np.ndarray]:
    rows = rng.choice([1, 1, 2, 3, 5, 8, 64 if rng.random() < 0.05 else 1])
    x = np.random.default_rng(tag).standard_normal((rows, 64)).astype(np.float32)
    message = pb.ModelInferRequest(model_name="mlp_onnx", id=str(tag))
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 64])
    message.raw_input_contents.append(x.tobytes())
    return message.SerializeToString(), x


def check(reply: pb.ModelInferResponse, x: np.ndarray, counts: collections.Counter) -> None:
    y = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(len(x), 10)
    if np.allclose(y, mlp_reference(x), rtol=1e-4, atol=1e-5):
        counts["right"] += 1
    else:
        counts["WRONG"] += 1


async def unary(channel: grpc.aio.Channel, seconds: float, seed: int, counts: collections.Counter):
    rng = random.Random(seed)
    call = channel.unary_unary(INFER)
    end = time.monotonic() + seconds
    tag = seed * 10_000_000
    while time.monotonic() < end:
        tag += 1
        data, x = request(rng, tag)
        fate = rng.random()
        try:
            if fate < 0.1:  # cancelled mid-flight
                pending = call(data, timeout=10)
                await asyncio.sleep(rng.random() * 0.002)
                pending.cancel()
                counts["cancelled"] += 1
                continue
            timeout = 0.0005 if fate < 0.15 else 10
            reply = pb.ModelInferResponse.FromString(await call(data, timeout=timeout))
            if reply.id != str(tag):
                counts["WRONG id"] += 1
            check(reply, x, counts)
        except grpc.aio.AioRpcError as exc:
            counts[exc.code().name] += 1


async def stream(channel: grpc.aio.Channel, seconds: float, seed: int, counts: collections.Counter):
    rng = random.Random(seed)
    sent: dict[str, np.ndarray] = {}
    end = time.monotonic() + seconds

    async def requests():
        tag = seed * 10_000_000
        while time.monotonic() < end:
            for _ in range(rng.randrange(1, 4)):  # a few in flight at once
                tag += 1
                data, x = request(rng, tag)
                sent[str(tag)] = x
                yield data
            await asyncio.sleep(0.001)

    async for raw in channel.stream_stream(STREAM)(requests(), timeout=seconds + 30):
        answer = pb.ModelStreamInferResponse.FromString(raw)
        if answer.error_message:
            counts["stream error"] += 1
            continue
        x = sent.pop(answer.infer_response.id, None)
        if x is None:
            counts["WRONG id"] += 1
            continue
        check(answer.infer_response, x, counts)
    counts["stream unanswered"] += len(sent)


async def drive(url: str, seconds: float) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    channels = [grpc.aio.insecure_channel(url) for _ in range(4)]
    try:
        tasks = [unary(channels[i % 4], seconds, i + 1, counts) for i in range(40)]
        tasks += [stream(channels[i % 4], seconds, 100 + i, counts) for i in range(8)]
        await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    return counts


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_mlp_onnx(repo / "mlp_onnx", pool={"workers": 2, "threads": 1})
        for frontends in (1, 2):
            args = ("--frontends", str(frontends)) if frontends > 1 else ()
            server = ServerProcess(Path(tmp) / f"s{frontends}.log", repo, args=args)
            try:
                wait_until(server.ready_over_http, 300, "ready")
                counts = asyncio.run(drive(server.url, seconds))
                rows, batches = batch_rows(server.http_text("/metrics")[1])
                print(f"frontends={frontends}: {dict(sorted(counts.items()))}", flush=True)
                print(f"  {rows:.0f} rows in {batches:.0f} batches ({rows / batches:.2f} a batch)")
            finally:
                server.stop()
                errors = [
                    line
                    for line in server.log().splitlines()
                    if " ERROR " in line or "Traceback" in line
                ]
                print(f"  server log ERROR/Traceback lines: {len(errors)}")
                for line in errors[:10]:
                    print("   ", line[:240])


if __name__ == "__main__":
    main()
