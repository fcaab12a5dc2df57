"""The GPU benchmark: ResNet-50 fp16 (uint8 224×224×3 in, normalisation inside the model) and a
BERT-base-like encoder (seq 128), in-process eager and CUDA-graph floors per batch size, then the
same models through warmserve at concurrency 1–64, with the batch sizes the batcher formed.

    python -m benchmarks.gpu_bench --out DIR                 # on the GPU machine (cuda:0)
    python -m benchmarks.gpu_bench --smoke --device cpu      # tiny models on CPU: checks the script

Writes DIR/gpu_bench.json and prints markdown tables for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import loadgen
from benchmarks.gpu_models import image_model, save_model_folder, text_model
from serve.frontend.pb import grpc_service_pb2 as pb
from tests.integration.harness import ServerProcess

BATCHES = (1, 8, 16, 32, 64)


def _time_ms(fn: Any, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def floors(
    module: torch.nn.Module, example: Any, device: str, batches: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Eager and (on CUDA) CUDA-graph milliseconds per batch, in process, no serving."""
    rows = []
    with torch.inference_mode():
        for batch in batches:
            x = example(batch)
            for _ in range(3):
                module(x)
            eager = _time_ms(lambda x=x: module(x), device, 20)
            graph = None
            if device.startswith("cuda"):
                static = x.clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    module(static)
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    module(static)
                graph = _time_ms(g.replay, device, 50)
            rows.append({"batch": batch, "eager_ms": eager, "graph_ms": graph})
            print(
                f"  floor batch {batch:3d}: eager {eager:.2f} ms, "
                f"graph {graph or float('nan'):.2f} ms"
            )
    return rows


def payload(model: str, name: str, array: np.ndarray, datatype: str) -> bytes:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    message.raw_input_contents.append(array.tobytes())
    return message.SerializeToString()


def serve_and_load(
    root: Path, models: dict[str, bytes], levels: list[int], seconds: float
) -> dict[str, Any]:
    server = ServerProcess(root / "server.log", root / "repo")
    out: dict[str, Any] = {}
    try:
        server.wait_ready(timeout=600)
        for model, body in models.items():
            rows = []
            loadgen.run(server.url, model, concurrency=4, seconds=1.0, payload=body)
            for level in levels:
                before = server.client.get_inference_statistics(model).model_stats[0]
                result = loadgen.run(
                    server.url, model, concurrency=level, seconds=seconds, payload=body
                )
                after = server.client.get_inference_statistics(model).model_stats[0]
                batches = after.execution_count - before.execution_count
                rows_per_batch = (after.inference_count - before.inference_count) / max(1, batches)
                row = {**result.summary(), "rows_per_batch": rows_per_batch}
                rows.append(row)
                print(
                    f"  {model} c={level:3d}: {result.throughput:8.0f}/s p50 {result.p50_ms:.2f} "
                    f"p95 {result.p95_ms:.2f} p99 {result.p99_ms:.2f} ms, "
                    f"{rows_per_batch:.1f} rows/batch"
                )
            out[model] = rows
        out["log_warm_lines"] = [ln for ln in server.log().splitlines() if "warm:" in ln]
    finally:
        server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--smoke", action="store_true", help="tiny models and loads (CPU check)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    device, small = args.device, args.smoke
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    size, seq = (64, 16) if small else (224, 128)
    batches = (1, 4) if small else BATCHES
    levels = [1, 4] if small else [1, 4, 16, 64]
    max_batch = 8 if small else 64
    results: dict[str, Any] = {"device": device, "torch": torch.__version__, "smoke": small}
    if device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(0)
    image = image_model(device, dtype, size, small)
    text = text_model(device, dtype, small, seq)
    vocab = text.tokens.num_embeddings

    def images(b: int) -> torch.Tensor:
        return torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, device=device)

    def tokens(b: int) -> torch.Tensor:
        return torch.randint(0, vocab, (b, seq), dtype=torch.int64, device=device)

    print(f"{results.get('gpu', device)}: in-process floors")
    results["floor_resnet50"] = floors(image, images, device, batches)
    results["floor_encoder"] = floors(text, tokens, device, batches)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = {
            "workers": args.workers,
            "threads": 1 if device == "cpu" else 0,
            "startup_timeout_s": 600,
        }
        common = {"max_batch_size": max_batch, "device": device, "pool": pool}
        save_model_folder(
            root / "repo" / "resnet50", "resnet50", image, images(1), {
                **common,
                "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [size, size, 3]}],
                "outputs": [{"name": "LOGITS", "datatype": "FP32", "shape": [1000]}],
            },
        )  # fmt: skip
        width = text.positions.shape[-1]
        save_model_folder(
            root / "repo" / "encoder", "encoder", text, tokens(1), {
                **common,
                "inputs": [{"name": "IDS", "datatype": "INT64", "shape": [seq]}],
                "outputs": [{"name": "CLS", "datatype": "FP32", "shape": [width]}],
            },
        )  # fmt: skip
        del image, text
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        rng = np.random.default_rng(0)
        bodies = {
            "resnet50": payload(
                "resnet50",
                "IMAGE",
                rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8),
                "UINT8",
            ),
            "encoder": payload(
                "encoder", "IDS", rng.integers(0, vocab, (1, seq), dtype=np.int64), "INT64"
            ),
        }
        print("through warmserve")
        results["served"] = serve_and_load(root, bodies, levels, 1.0 if small else args.seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out / 'gpu_bench.json'}")


if __name__ == "__main__":
    main()
