"""Where the serving loop thread's CPU goes, by shared object (perf samples of that thread
alone, 1,999 Hz): the floor, the hop floor and warmserve, each measured twice in turn at one
closed-loop concurrency. µs of the thread's CPU per call.

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-28-twentysecond/loop_by_library.py 6 1
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks import loadgen
from benchmarks.compare import MODEL, FloorProcess
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

HZ = 1999
SHOWN = 8  # libraries per server


def record(
    name: str, server: FloorProcess | ServerProcess, seconds: float, concurrency: int
) -> None:
    results: list[loadgen.LoadResult] = []
    # The load runs a second longer than perf, which records the main (event-loop) thread only.
    load = threading.Thread(
        target=lambda: results.append(
            loadgen.run(server.url, MODEL, concurrency=concurrency, seconds=seconds + 1)
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "perf.data")
        load.start()
        pid = str(server.process.pid)
        perf = ["perf", "record", "-q", "-F", str(HZ), "-t", pid, "-o", data, "--"]
        subprocess.run([*perf, "sleep", str(seconds)], check=True)
        load.join()
        report = ["perf", "report", "-i", data, "--stdio", "--sort", "dso", "-q", "-n"]
        lines = subprocess.run(report, capture_output=True, text=True, check=True).stdout
    calls = results[0].count * seconds / (seconds + 1)
    rows = [(int(p[1]), p[2]) for p in (line.split() for line in lines.splitlines()) if len(p) >= 3]

    def per_call(samples: int) -> float:
        return samples / HZ / calls * 1e6

    total = sum(samples for samples, _ in rows)
    print(
        f"{name:10s} c={concurrency}: {calls:.0f} calls, loop thread {per_call(total):.1f} µs/call"
    )
    for samples, library in rows[:SHOWN]:
        print(f"    {library:48s} {per_call(samples):6.1f}")


def main() -> None:
    seconds, concurrency = float(sys.argv[1]), int(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        floor = FloorProcess(root / "repo" / MODEL, root / "floor.log")
        running.callback(floor.stop)
        hop = FloorProcess(root / "repo" / MODEL, root / "hop.log", hop=True)
        running.callback(hop.stop)
        served = ServerProcess(root / "warmserve.log", root / "repo", ())
        running.callback(served.stop)
        wait_until(served.ready_over_http, 300, "warmserve ready")
        servers = (("floor", floor), ("hop", hop), ("warmserve", served))
        for _, server in servers:
            loadgen.run(server.url, MODEL, concurrency=4, seconds=1.0)
        for _ in range(2):
            for name, server in servers:
                record(name, server, seconds, concurrency)


if __name__ == "__main__":
    main()
