"""Evidence (seventeenth session): two warmserve servers, as two pods behind a client-side
balancer, and one of them stopped under load.

Two servers (the ONNX MLP, drain delay 0, grace period 10 s) on two ports; 16 grpc.aio channels,
each balancing round_robin over both addresses (gRPC's client-side balancing, as against a
headless Service), call at full rate. After LOAD_S server A gets SIGTERM; the callers go on
until A has exited and for AFTER_S more, then stop. Every failed call is counted by status.
Modes, alternated round by round:

    age0: WARMSERVE_MAX_CONNECTION_AGE_S=0   (no age: the plain graceful stop)
    age2: WARMSERVE_MAX_CONNECTION_AGE_S=2   (the stop waits for busy clients to move away)

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-27-seventeenth/shutdown_pair.py ROUNDS
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
AFTER_S = 1.0
METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODES = {"age0": "0", "age2": "2"}


def request() -> bytes:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    message = pb.ModelInferRequest(model_name="mlp_onnx")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
    message.raw_input_contents.append(x.tobytes())
    return bytes(message.SerializeToString())


async def load(stopped: ServerProcess, other: ServerProcess) -> dict[str, object]:
    payload = request()
    failed: collections.Counter[str] = collections.Counter()
    calls = [0]
    done = asyncio.Event()
    target = f"ipv4:127.0.0.1:{stopped.port},127.0.0.1:{other.port}"

    async def caller(i: int) -> None:
        options = [("grpc.lb_policy_name", "round_robin"), ("warmserve.evidence.conn", i)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            call = channel.unary_unary(METHOD)
            while not done.is_set():
                try:
                    await call(payload, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    failed[exc.code().name] += 1
                calls[0] += 1

    tasks = [asyncio.create_task(caller(i)) for i in range(CHANNELS)]
    await asyncio.sleep(LOAD_S)  # (the load's length, not a synchronisation)
    signalled = time.monotonic()
    stopped.terminate()
    await asyncio.to_thread(stopped.process.wait, 60)
    exit_s = time.monotonic() - signalled
    await asyncio.sleep(AFTER_S)  # (calls go on to the other server meanwhile)
    done.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return {"failed": failed, "calls": calls[0], "exit_s": exit_s}


def main() -> None:
    rounds = int(sys.argv[1])
    folder = Path(tempfile.mkdtemp(prefix="shutdown-pair-"))
    build_mlp_onnx(folder / "repo" / "mlp_onnx")
    totals: dict[str, collections.Counter[str]] = {m: collections.Counter() for m in MODES}
    for r in range(rounds):
        for mode, age in MODES.items():
            servers = [
                ServerProcess(
                    folder / f"{mode}-{r}-{side}.log",
                    folder / "repo",
                    args=("--grace-period", "10"),
                    env={"WARMSERVE_MAX_CONNECTION_AGE_S": age},
                )
                for side in "ab"
            ]
            try:
                for server in servers:
                    wait_until(server.ready_over_http, 120, "ready")
                result = asyncio.run(load(*servers))
            finally:
                for server in servers:
                    server.stop()
            failed = result["failed"]
            assert isinstance(failed, collections.Counter)
            totals[mode].update(failed)
            print(
                f"round {r} {mode}: failed {dict(failed)} of {result['calls']} calls, "
                f"A exited {result['exit_s']:.2f} s after SIGTERM",
                flush=True,
            )
    print(f"\n{rounds} rounds, {CHANNELS} channels balancing round_robin over two servers")
    for mode, counts in totals.items():
        print(f"{mode}: failed calls {dict(counts)}")


if __name__ == "__main__":
    main()
