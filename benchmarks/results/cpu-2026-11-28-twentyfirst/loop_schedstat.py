"""The serving loop thread's share of the wall time on a CPU and waiting, runnable, for one
(Linux schedstat), at closed-loop concurrencies (cN) and open-loop rates (rN calls/s):

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-28-twentyfirst/loop_schedstat.py c1 r2500
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from benchmarks import loadgen
from benchmarks.compare import MODEL
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

SECONDS = 3.0


def schedstat(pid: int) -> tuple[int, int]:
    """The main thread's ns on a CPU and ns waiting for one."""
    run, wait, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(run), int(wait)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        server = ServerProcess(root / "server.log", root / "repo", ())
        try:
            wait_until(server.ready_over_http, 300, "the server ready")
            loadgen.run(server.url, model=MODEL, concurrency=4, seconds=1.0)
            for level in sys.argv[1:]:
                value = float(level[1:])
                run0, wait0 = schedstat(server.process.pid)
                start = time.monotonic()
                if level.startswith("c"):
                    result = loadgen.run(server.url, MODEL, concurrency=int(value), seconds=SECONDS)
                else:
                    result = loadgen.run(server.url, MODEL, rate=value, seconds=SECONDS)
                run1, wait1 = schedstat(server.process.pid)
                wall = (time.monotonic() - start) * 1e9
                p50 = result.summary()["p50_ms"]
                print(
                    f"{level:7s} {result.throughput:6.0f} calls/s  p50 {p50:7.3f}"
                    f" ms  loop on a CPU {(run1 - run0) / wall:.2f}, waiting for one"
                    f" {(wait1 - wait0) / wall:.2f}"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
