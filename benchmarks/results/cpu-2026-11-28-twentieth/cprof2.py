"""Python function calls per request in a server's serving process (cProfile): the server runs
under ``python -m cProfile`` twice, once with no measured calls and once with 2,000 sequential
ModelInfer calls (both after the same 200 warm-up calls), and the counts are subtracted.

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-28-twentieth/cprof2.py ws|hop|floor
"""

from __future__ import annotations

import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from benchmarks import loadgen
from benchmarks.compare import MODEL
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import free_port

CALLS = 2000
WARM_UP = 200
START_TIMEOUT_S = 120.0


def run(calls: int, out: Path, root: Path, kind: str) -> None:
    port = free_port()
    if kind == "ws":
        command = ["-m", "serve", "serve", "--host", "127.0.0.1", "--grpc-port", str(port)]
        command += ["--http-port", str(free_port()), "--repository", str(root / "repo")]
    else:
        command = ["-m", "benchmarks.floor_server", "--model-dir", str(root / "repo" / MODEL)]
        command += ["--port", str(port), *(["--hop"] if kind == "hop" else [])]
    with (root / f"{kind}{calls}.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "cProfile", "-o", str(out), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                payload = loadgen.request_bytes(MODEL)
                deadline = time.monotonic() + START_TIMEOUT_S
                while True:
                    try:
                        call(payload, timeout=5)
                        break
                    except grpc.RpcError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
                for _ in range(WARM_UP + calls):
                    call(payload, timeout=5)
        finally:  # a graceful stop, so that cProfile writes its file
            server.send_signal(signal.SIGTERM if kind == "ws" else signal.SIGINT)
            server.wait(60)


def main() -> None:
    kind = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        run(0, root / "idle.prof", root, kind)
        run(CALLS, root / "calls.prof", root, kind)
        idle = pstats.Stats(str(root / "idle.prof")).stats  # type: ignore[attr-defined]
        busy = pstats.Stats(str(root / "calls.prof")).stats  # type: ignore[attr-defined]
    rows = []
    for key, figures in busy.items():
        per_call = (figures[1] - idle.get(key, (0, 0))[1]) / CALLS
        if per_call >= 0.5:
            rows.append((per_call, key))
    rows.sort(reverse=True)
    print(f"function calls per request {sum(n for n, _ in rows):.1f}")
    for per_call, (path, line, function) in rows:
        print(f"{per_call:6.2f} {path.split('/lib/python3.11/')[-1]}:{line} {function}")


if __name__ == "__main__":
    main()
