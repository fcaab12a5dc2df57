"""Evidence (seventeenth session): what a whole-server SIGTERM costs the clients calling it.

A warmserve server (the ONNX MLP, drain delay 0, grace period 10 s) is started, 16 grpc.aio
channels (one connection each) call it at full rate, and after LOAD_S it gets SIGTERM. Each
channel goes on until its first error, and records that error's status: UNAVAILABLE is a call
the server never took (its connection had gone: retryable, and in a cluster the client's next
connection reaches another pod); CANCELLED is a call the server had taken and then dropped
(gRPC's stop cancels the calls it holds in that instant, grpc/grpc#41785). Modes, alternated
round by round:

    age0: WARMSERVE_MAX_CONNECTION_AGE_S=0   (no age: the plain graceful stop)
    age2: WARMSERVE_MAX_CONNECTION_AGE_S=2   (the stop waits for busy clients to move away)

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-27-seventeenth/shutdown_under_load.py \
        ROUNDS FRONTENDS
"""

from __future__ import annotations

import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

CHANNELS = 16
LOAD_S = 1.5
METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODES = {"age0": "0", "age2": "2"}


def request() -> bytes:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    message = pb.ModelInferRequest(model_name="mlp_onnx")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
    message.raw_input_contents.append(x.tobytes())
    return bytes(message.SerializeToString())


async def load(server: ServerProcess) -> dict[str, object]:
    payload = request()
    first_error: list[str | None] = [None] * CHANNELS
    served_after = [0] * CHANNELS
    stopping = asyncio.Event()

    async def caller(i: int) -> None:
        options = [("warmserve.evidence.conn", i)]
        async with grpc.aio.insecure_channel(server.url, options=options) as channel:
            call = channel.unary_unary(METHOD)
            while first_error[i] is None:
                try:
                    await call(payload, timeout=30)
                    if stopping.is_set():
                        served_after[i] += 1
                except grpc.aio.AioRpcError as exc:
                    first_error[i] = exc.code().name

    tasks = [asyncio.create_task(caller(i)) for i in range(CHANNELS)]
    await asyncio.sleep(LOAD_S)  # (the load's length, not a synchronisation)
    stopping.set()
    signalled = time.monotonic()
    server.terminate()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    await asyncio.to_thread(server.process.wait, 60)
    return {
        "errors": collections.Counter(first_error),
        "served_after": sum(served_after),
        "exit_s": time.monotonic() - signalled,
        "code": server.process.returncode,
    }


def main() -> None:
    rounds, frontends = int(sys.argv[1]), int(sys.argv[2])
    folder = Path(tempfile.mkdtemp(prefix="shutdown-evidence-"))
    build_mlp_onnx(folder / "repo" / "mlp_onnx")
    totals: dict[str, collections.Counter[str]] = {m: collections.Counter() for m in MODES}
    for r in range(rounds):
        for mode, age in MODES.items():
            server = ServerProcess(
                folder / f"{mode}-{r}.log",
                folder / "repo",
                args=("--frontends", str(frontends), "--grace-period", "10"),
                env={"WARMSERVE_MAX_CONNECTION_AGE_S": age},
            )
            try:
                wait_until(server.ready_over_http, 120, "ready")
                result = asyncio.run(load(server))
            finally:
                server.stop()
            errors = result["errors"]
            assert isinstance(errors, collections.Counter)
            totals[mode].update(errors)
            print(
                f"round {r} {mode}: first errors {dict(errors)}, calls served after SIGTERM "
                f"{result['served_after']}, exit after {result['exit_s']:.2f} s, "
                f"code {result['code']}",
                flush=True,
            )
    print(f"\n{rounds} rounds, {CHANNELS} channels, --frontends {frontends}")
    for mode, counts in totals.items():
        print(f"{mode}: {dict(counts)}")


if __name__ == "__main__":
    main()
