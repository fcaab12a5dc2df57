"""Evidence (eighteenth session): what the new default connection age (8 s) costs callers at
full rate, against no age: the demo MLP, c=16 over 2 client processes of 4 connections each,
SECONDS per run (several ages long), the two settings alternated round by round.

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-27-eighteenth/age_cost.py ROUNDS SECONDS
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from benchmarks import loadgen
from benchmarks.compare import MODEL
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until


def main() -> None:
    rounds, seconds = int(sys.argv[1]), float(sys.argv[2])
    folder = Path(tempfile.mkdtemp(prefix="age-cost-"))
    build_mlp_onnx(folder / "repo" / MODEL)
    for r in range(rounds):
        for age in ("0", "8"):
            server = ServerProcess(
                folder / f"age{age}-{r}.log",
                folder / "repo",
                env={"WARMSERVE_MAX_CONNECTION_AGE_S": age},
            )
            try:
                wait_until(server.ready_over_http, 120, "ready")
                load = {"concurrency": 16, "processes": 2, "connections": 4}
                loadgen.run(server.url, MODEL, seconds=1.0, **load)  # warm
                result = loadgen.run(server.url, MODEL, seconds=seconds, **load)
            finally:
                server.stop()
            s = result.summary()
            print(
                f"round {r} age {age}: {s['throughput']:.0f}/s, p50 {s['p50_ms']:.2f} "
                f"p99 {s['p99_ms']:.2f} max {s['max_ms']:.1f} ms, calls {s['count']}, "
                f"errors {s['errors']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
