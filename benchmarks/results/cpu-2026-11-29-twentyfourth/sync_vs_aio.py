"""Is there a Python gRPC front end cheaper per call than grpc.aio? The floor (grpc.aio on
uvloop, the model in the handler) against the same handler on grpc's synchronous server (a
thread pool, ``sync``) and against that synchronous server handing each call to an asyncio loop
thread that runs the model (``bridge``: what a sync front end over warmserve's asyncio core would
be). Closed-loop c=1 and c=16 with the Python load generator, servers started afresh every round
and measured in turn; CPU per call of the server's whole process from /proc.

    PYTHONPATH=. python .../sync_vs_aio.py ROUNDS SECONDS THREADS
    PYTHONPATH=. python .../sync_vs_aio.py --serve sync|bridge MODEL_DIR PORT THREADS  (a server)
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop

from benchmarks import loadgen
from benchmarks.compare import MODEL, FloorProcess
from benchmarks.floor_server import FloorServicer
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import free_port, wait_until

TICKS = os.sysconf("SC_CLK_TCK")
LEVELS = (1, 16)


def serve(kind: str, model_dir: str, port: int, threads: int) -> None:
    floor = FloorServicer(Path(model_dir))

    def infer(request: Any) -> Any:
        tensor = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
        (y,) = floor.session.run([floor.output.name], {floor.input.name: x.reshape(tensor.shape)})
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        out = response.outputs.add()
        out.name, out.datatype = floor.output.name, "FP32"
        out.shape.extend(y.shape)
        response.raw_output_contents.append(y.tobytes())
        return response

    if kind == "bridge":
        loop = uvloop.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def on_loop(request: Any) -> Any:
            return infer(request)

        def handler(request: Any, context: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(on_loop(request), loop).result(10)
    else:

        def handler(request: Any, context: Any) -> Any:
            return infer(request)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    method = grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    service = "inference.GRPCInferenceService"
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {"ModelInfer": method}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("listening", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1)


def cpu_s(pid: int) -> float:
    ticks = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / TICKS


def main() -> None:
    if sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    rounds, seconds, threads = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    figures: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        for index in range(rounds):
            servers: list[tuple[str, str, Any]] = []
            floor = FloorProcess(root / "repo" / MODEL, root / f"floor{index}.log")
            servers.append(("aio", floor.url, floor.process))
            logs = []
            try:
                for kind in ("sync", "bridge"):
                    port = free_port()
                    log = root / f"{kind}{index}.log"
                    logs.append(log.open("wb"))
                    command = [sys.executable, __file__, "--serve", kind]
                    command += [str(root / "repo" / MODEL), str(port), threads]
                    process = subprocess.Popen(command, stdout=logs[-1], stderr=subprocess.STDOUT)
                    servers.append((kind, f"127.0.0.1:{port}", process))
                    wait_until(lambda log=log: b"listening" in log.read_bytes(), 60, kind)
                for name, url, process in servers:
                    for level in LEVELS:
                        loadgen.run(url, MODEL, concurrency=level, seconds=0.5)
                        before = cpu_s(process.pid)
                        result = loadgen.run(url, MODEL, concurrency=level, seconds=seconds)
                        per_call = (cpu_s(process.pid) - before) / result.count * 1e6
                        row = (result.throughput, result.p50_ms, per_call)
                        figures.setdefault((name, level), []).append(row)
                        print(
                            f"round {index} {name:6s} c={level:<2d} {row[0]:6.0f} calls/s "
                            f"p50 {row[1]:.3f} ms  CPU {row[2]:4.0f} µs/call",
                            flush=True,
                        )
            finally:
                floor.stop()
                for _, _, process in servers[1:]:
                    process.terminate()
                    process.wait(10)
                for log_file in logs:
                    log_file.close()
    print(f"\nmedians of {rounds} rounds of {seconds:g} s, {threads} handler threads")
    for level in LEVELS:
        base = [statistics.median(r[i] for r in figures[("aio", level)]) for i in range(3)]
        for name in ("aio", "sync", "bridge"):
            got = [statistics.median(r[i] for r in figures[(name, level)]) for i in range(3)]
            print(
                f"c={level:<2d} {name:6s} {got[0]:6.0f} calls/s ({got[0] / base[0]:.2f}x) "
                f"p50 {got[1]:.3f} ms ({got[1] / base[1]:.2f}x) "
                f"CPU {got[2]:4.0f} µs/call ({got[2] / base[2]:.2f}x)"
            )


if __name__ == "__main__":
    main()
