"""warmserve and the floors under perf_analyzer (Triton's C++ client, far lighter than the
Python load generator) at one concurrency: throughput, p50, the server tree's CPU per call, the
serving loop thread's share of the wall time on a CPU and waiting for one (schedstat), and for
warmserve the rows per batch (ModelStatistics). Servers measured in turn, rounds alternated.

    PYTHONPATH=. python .../pa_c16.py ROUNDS CONCURRENCY [BASE_CHECKOUT]

With BASE_CHECKOUT, warmserve from that checkout (``warmserve-base``) is measured too, in turn
with the working tree's.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks import loadgen, pa_report
from benchmarks.compare import MODEL, PERF_ANALYZER, FloorProcess
from benchmarks.proctree import tree_cpu_seconds
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

INTERVAL_MS = 4000


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds the process's main thread has run on a CPU and waited, runnable, for one."""
    run_ns, wait_ns, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def batches(url: str) -> tuple[int, int]:
    """(rows, batches) run so far by warmserve's MLP."""
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelStatistics",
            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=pb.ModelStatisticsResponse.FromString,
        )
        stats = call(pb.ModelStatisticsRequest(name=MODEL), timeout=10).model_stats[0]
    runs = {s.batch_size: s.compute_infer.count for s in stats.batch_stats}
    return sum(size * n for size, n in runs.items()), sum(runs.values())


def measure(url: str, pid: int, concurrency: int, warmserve: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pa.csv"
        command = [str(PERF_ANALYZER), "-m", MODEL, "-i", "grpc", "-u", url, "-f", str(report)]
        command += ["--concurrency-range", f"{concurrency}:{concurrency}"]
        command += ["--measurement-interval", str(INTERVAL_MS), "--stability-percentage", "50"]
        rows0, batches0 = batches(url) if warmserve else (0, 0)
        cpu0, (run0, wait0), wall0 = tree_cpu_seconds(pid), schedstat(pid), time.monotonic()
        subprocess.run(command, capture_output=True, check=True, timeout=120)
        cpu1, (run1, wait1), wall1 = tree_cpu_seconds(pid), schedstat(pid), time.monotonic()
        rows1, batches1 = batches(url) if warmserve else (0, 0)
        result: dict[str, Any] = pa_report.parse_csv(report.read_text(), concurrency)
    wall = wall1 - wall0
    calls = result["throughput"] * wall  # (perf_analyzer's warm-up and windows: approximate)
    return {
        "calls/s": result["throughput"],
        "p50 ms": result["p50_ms"],
        "tree µs/call": (cpu1 - cpu0) / calls * 1e6,
        "loop busy": (run1 - run0) / wall,
        "loop waits": (wait1 - wait0) / wall,
        "rows/batch": (rows1 - rows0) / max(1, batches1 - batches0) if warmserve else 0.0,
    }


def main() -> None:
    rounds, concurrency = int(sys.argv[1]), int(sys.argv[2])
    base = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    figures: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        floor = FloorProcess(root / "repo" / MODEL, root / "floor.log")
        hop = FloorProcess(root / "repo" / MODEL, root / "hop.log", hop=True)
        served = ServerProcess(root / "warmserve.log", root / "repo", ())
        servers: dict[str, FloorProcess | ServerProcess] = {"floor": floor, "hop": hop}
        if base is not None:
            servers["warmserve-base"] = ServerProcess(
                root / "base.log", root / "repo", (), cwd=base
            )
        servers["warmserve"] = served
        try:
            for server in servers.values():
                if isinstance(server, ServerProcess):
                    wait_until(server.ready_over_http, 300, "warmserve ready")
            for server in servers.values():
                loadgen.run(server.url, MODEL, concurrency=4, seconds=1.0)
            for index in range(rounds):
                names = list(servers) if index % 2 == 0 else list(servers)[::-1]
                for name in names:
                    server = servers[name]
                    ours = isinstance(server, ServerProcess)
                    row = measure(server.url, server.process.pid, concurrency, ours)
                    figures.setdefault(name, []).append(row)
                    text = "  ".join(f"{k} {v:.3g}" for k, v in row.items())
                    print(f"round {index} {name:9s} {text}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    print(f"\nmedians of {rounds} rounds, perf_analyzer c={concurrency}")
    for name, rows in figures.items():
        text = "  ".join(f"{k} {statistics.median(r[k] for r in rows):.3g}" for k in rows[0])
        print(f"{name:9s} {text}")


if __name__ == "__main__":
    main()
