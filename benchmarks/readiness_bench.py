"""Readiness and recovery figures, measured from outside the server.

    .venv/bin/python -m benchmarks.readiness_bench --model mlp_torch --workers 2

1. time from process start to gRPC health SERVING (a Watch on the whole server);
2. latency of the first request after SERVING, against the warm p50 of the next requests;
3. kill -9 of one worker under closed-loop load: time until the pool is back at ``min_warm``
   (health SERVING and a new worker process), and p50/p95 of the calls during that recovery,
   against the same figures before the kill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.testing import models
from tests.integration.harness import CallerThreads, ServerProcess, wait_until

BUILDERS = {"mlp_onnx": models.build_mlp_onnx, "mlp_torch": models.build_mlp_torch}


def _input() -> list[triton.InferInput]:
    tensor = triton.InferInput("INPUT0", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    return [tensor]


CLIENT_WARM_CALLS = 20


def _call_ms(client: triton.InferenceServerClient, model: str) -> float:
    start = time.perf_counter()
    client.infer(model, _input())
    return (time.perf_counter() - start) * 1e3


def _wait_serving(url: str, timeout: float) -> None:
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        deadline = time.monotonic() + timeout
        while True:
            try:
                for reply in stub.Watch(request, timeout=max(1.0, deadline - time.monotonic())):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)  # the port is not open yet: poll the connection


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    p50, p95, p99 = np.percentile(values, (50, 95, 99))
    return {
        "count": len(values),
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "max_ms": max(values),
    }


class ClosedLoop(CallerThreads):
    """Closed-loop callers that record (finish time, ms) of every successful call."""

    def __init__(self, url: str, model: str, threads: int) -> None:
        super().__init__(url, threads, max_calls=10**9)  # stopped by the with block
        self.model = model
        self.samples: list[tuple[float, float]] = []  # (finish time, ms)

    def call(self, client: triton.InferenceServerClient, seed: int, n: int) -> None:
        ms = _call_ms(client, self.model)
        self.samples.append((time.monotonic(), ms))

    def between(self, start: float, end: float) -> list[float]:
        return [ms for t, ms in list(self.samples) if start <= t <= end]


def run(model: str, workers: int, threads: int, start: str, root: Path) -> dict[str, object]:
    pool = {"workers": workers, "threads": 1, "worker_start": start}
    BUILDERS[model](root / "repo" / model, pool=pool)
    started = time.monotonic()
    server = ServerProcess(root / "server.log", root / "repo")
    try:
        _wait_serving(server.url, 300)
        to_serving = time.monotonic() - started
        server.client.is_server_live()  # open the client's connection: measure the server only
        for _ in range(CLIENT_WARM_CALLS):  # warm the client's own infer path (a new
            # tritonclient's first infer is ~0.5 ms slower against any server): an unknown model
            # answers NOT_FOUND without touching the model's batcher or workers
            with contextlib.suppress(triton.InferenceServerException):
                server.client.infer("no-such-model", _input())
        first = _call_ms(server.client, model)
        warm = [_call_ms(server.client, model) for _ in range(500)]
        with ClosedLoop(server.url, model, threads) as load:
            time.sleep(3.0)  # measurement window before the kill (not a synchronisation)
            before_end = time.monotonic()
            victim = server.worker_pids()[0]
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: victim not in server.worker_pids(), 30, "the kill")

            def recovered() -> bool:
                pids = server.worker_pids()
                return (
                    len(pids) == workers
                    and victim not in pids
                    and server.health(model) == "SERVING"
                )

            wait_until(recovered, 120, "recovery to min_warm")
            back = time.monotonic()
        return {
            "model": model,
            "workers": workers,
            "worker_start": start,
            "load_threads": threads,
            "start_to_serving_s": to_serving,
            "first_request_ms": first,
            "warm": _percentiles(warm),
            "first_over_warm_p50": first / float(np.percentile(warm, 50)),
            "recovery_s": back - killed,
            "before_kill": _percentiles(load.between(before_end - 3.0, before_end)),
            "during_recovery": _percentiles(load.between(killed, back)),
            "errors_during_load": len(load.errors),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(BUILDERS), default="mlp_torch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=4, help="closed-loop callers during recovery"
    )
    parser.add_argument("--worker-start", choices=["template", "spawn"], default="template")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.model, args.workers, args.threads, args.worker_start, Path(tmp))
    print(json.dumps(result, indent=2, default=float))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
