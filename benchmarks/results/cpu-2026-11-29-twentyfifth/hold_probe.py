"""An open loop near saturation, per server: rows per batch (warmserve's /metrics), the tree's
CPU per call, p50 and p99, for the floor, warmserve (this working tree) and warmserve from another
checkout (VARIANT_DIR: a scratch worktree with the change under test), in alternated rounds,
each server started afresh.

    PYTHONPATH=. python hold_probe.py ROUNDS SECONDS VARIANT_DIR RATE...
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import loadgen, proctree
from benchmarks.compare import MODEL, FloorProcess
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until


def rows_counters(server: ServerProcess) -> tuple[float, float]:
    _, text = server.http_text("/metrics")
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("warmserve_batch_rows_sum{"):
            total = float(line.rsplit(" ", 1)[1])
        if line.startswith("warmserve_batch_rows_count{"):
            count = float(line.rsplit(" ", 1)[1])
    return total, count


def main() -> None:
    rounds, seconds, variant = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    rates = [float(r) for r in sys.argv[4:]]
    results: dict[tuple[str, float], list[tuple[float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        for index in range(rounds):
            sides = ["main", "variant", "floor"]
            if index % 2:
                sides.reverse()
            for side in sides:
                if side == "floor":
                    server = FloorProcess(root / "repo" / MODEL, root / f"floor{index}.log")
                    pid, url = server.process.pid, server.url
                else:
                    cwd = None if side == "main" else variant
                    server = ServerProcess(root / f"{side}{index}.log", root / "repo", cwd=cwd)
                    wait_until(server.ready_over_http, 300, "ready")
                    pid, url = server.process.pid, server.url
                try:
                    loadgen.run(url, MODEL, concurrency=4, seconds=1.0)
                    for rate in rates:
                        r0 = rows_counters(server) if side != "floor" else (0, 0)
                        c0 = proctree.tree_cpu_seconds(pid)
                        res = loadgen.run(url, MODEL, rate=rate, seconds=seconds)
                        c1 = proctree.tree_cpu_seconds(pid)
                        r1 = rows_counters(server) if side != "floor" else (0, 1)
                        rows = (r1[0] - r0[0]) / max(1.0, r1[1] - r0[1])
                        cpu = (c1 - c0) / max(1, res.count) * 1e6
                        figures = (res.p50_ms, res.p99_ms, rows, cpu)
                        results.setdefault((side, rate), []).append(figures)
                        print(
                            f"round {index} {side:8s} {rate:6.0f}/s p50 {res.p50_ms:7.2f} "
                            f"p99 {res.p99_ms:7.2f} rows/batch {rows:5.2f} cpu {cpu:4.0f} "
                            f"lag {res.send_lag_p99_ms:.1f}",
                            flush=True,
                        )
                finally:
                    server.stop()
    print("medians")
    for (side, rate), rows in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        a = np.median(np.array(rows), axis=0)
        print(
            f"  {side:8s} {rate:6.0f}/s p50 {a[0]:7.2f} p99 {a[1]:7.2f} "
            f"rows/batch {a[2]:5.2f} cpu {a[3]:4.0f}"
        )


if __name__ == "__main__":
    main()
