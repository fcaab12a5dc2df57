"""The open loop with its arrivals on the event loop's timer (the fallback) against a timerfd
(benchmarks.arrivals), alternated, against the floor server and warmserve; closed-loop c=1 beside.

    PYTHONPATH=. .venv/bin/python \
        benchmarks/results/cpu-2026-11-28-nineteenth/open_loop_ab.py [ROUNDS]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import uvloop

from benchmarks import arrivals, loadgen
from benchmarks.compare import MODEL, FloorProcess
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess

REAL_LIBC = arrivals._libc


def run(url: str, rate: float, precise: bool) -> loadgen.LoadResult:
    arrivals._libc = REAL_LIBC if precise else (lambda: None)  # type: ignore[assignment]
    payload = loadgen.request_bytes(MODEL)
    return uvloop.run(loadgen.open_loop(url, payload, rate, 2.0))


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_mlp_onnx(Path(tmp) / "repo" / MODEL)
        floor = FloorProcess(folder, Path(tmp) / "floor.log")
        server = ServerProcess(Path(tmp) / "w.log", Path(tmp) / "repo")
        try:
            server.wait_ready()
            for name, url in (("floor", floor.url), ("warmserve", server.url)):
                payload = loadgen.request_bytes(MODEL)
                closed = [uvloop.run(loadgen.closed_loop(url, payload, 1, 2.0)) for _ in range(2)]
                print(f"{name:9s} closed c=1: p50 {np.median([c.p50_ms for c in closed]):.3f} ms")
                for rate in (250.0, 1000.0):
                    got: dict[bool, list[loadgen.LoadResult]] = {False: [], True: []}
                    for i in range(rounds):
                        for precise in (False, True) if i % 2 == 0 else (True, False):
                            got[precise].append(run(url, rate, precise))
                    for precise, results in got.items():
                        how = "timerfd   " if precise else "loop timer"
                        med = {
                            k: float(np.median([getattr(r, k) for r in results]))
                            for k in ("p50_ms", "p95_ms", "p99_ms", "send_lag_p99_ms")
                        }
                        print(
                            f"{name:9s} open {rate:5.0f}/s {how}: p50 {med['p50_ms']:.3f} "
                            f"p95 {med['p95_ms']:.3f} p99 {med['p99_ms']:.3f} ms, send lag p99 "
                            f"{med['send_lag_p99_ms']:.3f} ms (medians of {rounds})"
                        )
        finally:
            server.stop()
            floor.stop()


if __name__ == "__main__":
    main()
