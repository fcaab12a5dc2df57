"""What the serving process spends per call with and without relay processes (``--frontends``).

    python -m benchmarks.relay_cost [--model mlp_onnx] [--concurrency 16] [--rounds 2]
    python -m benchmarks.relay_cost --image [--concurrency 64] [--perf DIR]

``--image`` serves a model with ResNet-50's request and reply sizes (uint8 224×224×3 in, 1,000
FP32 out) that computes next to nothing (the first 1,000 bytes, as floats), so what is measured
is the cost of moving a 150 KB call through the serving process, as on the GPU host.

Serves the demo models with ``--frontends 1`` (the serving process terminates gRPC itself) and
``--frontends N`` (N relays terminate gRPC and pass calls on), alternating, under the same closed
loop (2 client processes, 4 connections each). It prints throughput, latency, the serving
process's busiest thread in µs per call (the figure that caps one process's rate), and the CPU
of the whole server tree per call. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import loadgen, proctree
from serve.testing.models import write_config
from tests.integration.harness import ServerProcess, wait_until

IMAGE_SHAPE = (224, 224, 3)


def build_image_passthrough(folder: Path, name: str = "image_passthrough") -> Path:
    """ONNX: IMAGE uint8 [B, 224, 224, 3] → LOGITS fp32 [B, 1000], the first 1,000 bytes of each
    image as floats. ResNet-50's sizes each way, next to no compute."""
    import onnx
    from onnx import TensorProto, helper

    row = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    consts = [
        helper.make_tensor(n, TensorProto.INT64, [len(v)], v)
        for n, v in (("shape", [-1, row]), ("starts", [0]), ("ends", [1000]), ("axes", [1]))
    ]
    nodes = [
        helper.make_node("Reshape", ["IMAGE", "shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["head"]),
        helper.make_node("Cast", ["head"], ["LOGITS"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("IMAGE", TensorProto.UINT8, ["batch", *IMAGE_SHAPE])],
        [helper.make_tensor_value_info("LOGITS", TensorProto.FLOAT, ["batch", 1000])],
        initializer=consts,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return write_config(folder, {
        "name": name, "backend": "onnx", "model_file": "model.onnx", "max_batch_size": 64,
        "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": list(IMAGE_SHAPE)}],
        "outputs": [{"name": "LOGITS", "datatype": "FP32", "shape": [1000]}],
        "pool": {"workers": 1, "threads": 1},
    })  # fmt: skip


def image_request(model: str) -> bytes:
    from serve.frontend.pb import grpc_service_pb2 as pb  # not beside tritonclient's in tests

    image = np.random.default_rng(0).integers(0, 256, (1, *IMAGE_SHAPE), dtype=np.uint8)
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="IMAGE", datatype="UINT8", shape=list(image.shape))
    message.raw_input_contents.append(image.tobytes())
    return bytes(message.SerializeToString())


def measure(
    frontends: int, model: str, concurrency: int, seconds: float, log: Path,
    repo: Path | None = None, payload: bytes = b"", perf: Path | None = None,
) -> Any:  # fmt: skip
    """One set-up under load; with ``perf``, Linux perf samples the serving process's event-loop
    thread (its main thread) into that file while the load runs."""
    args = ("--frontends", str(frontends)) if frontends > 1 else ()
    server = ServerProcess(log, repo, args=args)
    recorder = None
    try:
        wait_until(server.ready_over_http, 300, "server ready")
        load: dict[str, Any] = {
            "concurrency": concurrency,
            "processes": 2,
            "connections": 4,
            "payload": payload,
        }
        loadgen.run(server.url, model, seconds=1.0, **load)  # warm the path and the clients
        pid = server.process.pid
        if perf is not None:
            window = str(max(1.0, seconds - 1.0))  # inside the load, whose clients start first
            command = ["perf", "record", "-q", "-F", "2000", "-t", str(pid), "-o", str(perf)]
            recorder = subprocess.Popen([*command, "--", "sleep", window])
        threads0, tree0 = proctree.thread_cpu_seconds(pid), proctree.tree_cpu_seconds(pid)
        result = loadgen.run(server.url, model, seconds=seconds, **load)
        threads1, tree1 = proctree.thread_cpu_seconds(pid), proctree.tree_cpu_seconds(pid)
        if recorder is not None:
            recorder.wait(timeout=30)
    finally:
        if recorder is not None and recorder.poll() is None:
            recorder.kill()
        server.stop()
    busiest = max(v - threads0.get(k, 0.0) for k, v in threads1.items())
    calls = max(1, result.count)
    return {
        **result.summary(),
        "frontends": frontends,
        "serving_busiest_thread_us_per_call": busiest / calls * 1e6,
        "serving_busiest_thread_share": busiest / result.seconds,
        "tree_us_per_call": (tree1 - tree0) / calls * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp_onnx")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--frontends", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument(
        "--image", action="store_true", help="a model with ResNet-50's request size (150 KB)"
    )
    parser.add_argument(
        "--perf",
        type=Path,
        help="record the serving process's loop thread with Linux perf into DIR/*.data",
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo, payload, model = None, b"", args.model
        if args.image:
            model = "image_passthrough"
            repo = Path(tmp) / "repo"
            build_image_passthrough(repo / model, model)
            payload = image_request(model)
        for round_ in range(args.rounds):
            for frontends in (1, args.frontends):
                log = Path(tmp) / f"server-{round_}-{frontends}.log"
                perf = None
                if args.perf:
                    args.perf.mkdir(parents=True, exist_ok=True)
                    perf = args.perf / f"serving-frontends{frontends}-round{round_}.data"
                row = measure(
                    frontends, model, args.concurrency, args.seconds, log, repo, payload, perf
                )
                rows.append(row)
                print(
                    f"frontends={frontends} c={args.concurrency}: {row['throughput']:.0f}/s "
                    f"p50 {row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} ms | serving process's "
                    f"busiest thread {row['serving_busiest_thread_us_per_call']:.0f} µs/call "
                    f"({row['serving_busiest_thread_share']:.0%} busy); whole tree "
                    f"{row['tree_us_per_call']:.0f} µs/call"
                )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
