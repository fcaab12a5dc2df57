"""The batch sizes warmserve forms for the demo MLP under a closed loop at concurrency C
(ModelStatistics' batch_stats, before and after the load):

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-28-twentyfirst/batch_sizes.py 16 10
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import grpc

from benchmarks import loadgen
from benchmarks.compare import MODEL
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until


def counts(channel: grpc.Channel) -> dict[int, int]:
    """Batches run so far, by size."""
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelStatistics",
        request_serializer=pb.ModelStatisticsRequest.SerializeToString,
        response_deserializer=pb.ModelStatisticsResponse.FromString,
    )
    stats = call(pb.ModelStatisticsRequest(name=MODEL), timeout=10)
    return {s.batch_size: s.compute_infer.count for s in stats.model_stats[0].batch_stats}


def main() -> None:
    concurrency, seconds = int(sys.argv[1]), float(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        server = ServerProcess(root / "server.log", root / "repo", ())
        try:
            wait_until(server.ready_over_http, 300, "the server ready")
            with grpc.insecure_channel(server.url) as channel:
                before = counts(channel)
                result = loadgen.run(server.url, MODEL, concurrency=concurrency, seconds=seconds)
                after = counts(channel)
        finally:
            server.stop()
    ran = {size: after[size] - before.get(size, 0) for size in sorted(after)}
    batches = sum(ran.values())
    rows = sum(size * count for size, count in ran.items())
    print(f"c={concurrency}: {result.throughput:.0f} calls/s, {batches} batches, {rows} rows,")
    print(f"  {rows / max(1, batches):.2f} rows per batch")
    for size, count in ran.items():
        if count:
            print(
                f"  {size:3d} rows: {count:6d} batches ({size * count / rows * 100:5.1f} % of rows)"
            )


if __name__ == "__main__":
    main()
