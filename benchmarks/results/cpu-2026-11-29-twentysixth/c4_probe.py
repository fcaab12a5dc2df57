"""A closed loop of a few callers: the floor, warmserve (holds on, the default) and warmserve with
``batching.hold_when_saturated = false``, in alternated rounds, each server started afresh. Prints
calls/s, p50, the tree's CPU per call and rows per batch, then the medians.

    PYTHONPATH=. python c4_probe.py ROUNDS SECONDS CONCURRENCY...
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import loadgen, proctree
from benchmarks.compare import MODEL, FloorProcess, batch_rows
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

Figures = tuple[float, float, float, float]  # calls/s, p50 ms, µs of CPU per call, rows/batch


def rows_counters(server: ServerProcess) -> tuple[float, float]:
    return batch_rows(server.http_text("/metrics")[1])


def measure(server: FloorProcess | ServerProcess, concurrency: int, seconds: float) -> Figures:
    warm = isinstance(server, ServerProcess)
    r0 = rows_counters(server) if warm else (0.0, 0.0)
    t0 = proctree.tree_cpu_seconds(server.process.pid)
    result = loadgen.run(server.url, MODEL, concurrency=concurrency, seconds=seconds)
    t1 = proctree.tree_cpu_seconds(server.process.pid)
    r1 = rows_counters(server) if warm else (0.0, 1.0)
    summary = result.summary()
    per_batch = (r1[0] - r0[0]) / max(1.0, r1[1] - r0[1])
    cpu = (t1 - t0) / max(1, result.count) * 1e6
    return summary["throughput"], summary["p50_ms"], cpu, per_batch


def main() -> None:
    rounds, seconds = int(sys.argv[1]), float(sys.argv[2])
    levels = [int(c) for c in sys.argv[3:]]
    figures: dict[tuple[str, int], list[Figures]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "hold" / MODEL)
        build_mlp_onnx(root / "nohold" / MODEL, batching={"hold_when_saturated": False})
        for index in range(rounds):
            sides = ["floor", "hold", "nohold"]
            if index % 2:
                sides.reverse()
            for side in sides:
                server: FloorProcess | ServerProcess
                if side == "floor":
                    server = FloorProcess(root / "hold" / MODEL, root / f"floor{index}.log")
                else:
                    server = ServerProcess(root / f"{side}{index}.log", root / side)
                    wait_until(server.ready_over_http, 300, "ready")
                try:
                    loadgen.run(server.url, MODEL, concurrency=4, seconds=1.0)
                    for level in levels:
                        row = measure(server, level, seconds)
                        figures.setdefault((side, level), []).append(row)
                        print(
                            f"round {index} {side:7s} c={level}: {row[0]:6.0f}/s p50 "
                            f"{row[1]:.3f} cpu {row[2]:.0f} rows/batch {row[3]:.2f}",
                            flush=True,
                        )
                finally:
                    server.stop()
    print("medians:")
    for (side, level), rows in sorted(figures.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = [statistics.median(row[k] for row in rows) for k in range(4)]
        print(
            f"  c={level} {side:7s} {m[0]:6.0f}/s p50 {m[1]:.3f} cpu {m[2]:.0f} "
            f"rows/batch {m[3]:.2f}"
        )


if __name__ == "__main__":
    main()
