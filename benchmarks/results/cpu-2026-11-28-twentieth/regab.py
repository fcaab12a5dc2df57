"""The floor server's registration variants (regfloor.py) side by side in alternated rounds:
p50, throughput and the tree's CPU per call, medians over the rounds.

    PYTHONPATH=. python .../regab.py all,hot,none ROUNDS SECONDS 1,16
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import loadgen, proctree
from benchmarks.compare import MODEL
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import free_port, wait_until

HERE = Path(__file__).parent


def start(mode: str, model_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, str(HERE / "regfloor.py"), "--model-dir", str(model_dir)]
    with log.open("wb") as out:
        server = subprocess.Popen(
            [*command, "--port", str(port)],
            env={**os.environ, "REG": mode},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_until(lambda: b"listening" in log.read_bytes(), 60, "the floor server")
    return server, f"127.0.0.1:{port}"


def main() -> None:
    modes = sys.argv[1].split(",")
    rounds, seconds = int(sys.argv[2]), float(sys.argv[3])
    levels = [int(x) for x in sys.argv[4].split(",")]
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {
        (m, c): [] for m in modes for c in levels
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / MODEL
        build_mlp_onnx(model_dir)
        for index in range(rounds):
            order = modes if index % 2 == 0 else modes[::-1]
            servers = {m: start(m, model_dir, Path(tmp) / f"{m}{index}.log") for m in order}
            try:
                for mode in order:
                    loadgen.run(servers[mode][1], MODEL, concurrency=4, seconds=1)
                for mode in order:
                    process, url = servers[mode]
                    for level in levels:
                        cpu0 = proctree.tree_cpu_seconds(process.pid)
                        result = loadgen.run(url, MODEL, concurrency=level, seconds=seconds)
                        cpu = proctree.tree_cpu_seconds(process.pid) - cpu0
                        row = result.summary()
                        per_call = cpu / result.count * 1e6
                        results[(mode, level)].append((row["p50_ms"], row["throughput"], per_call))
            finally:
                for process, _ in servers.values():
                    process.terminate()
                    process.wait(10)
    for (mode, level), rows in results.items():
        p50 = statistics.median(r[0] for r in rows)
        throughput = statistics.median(r[1] for r in rows)
        cpu = statistics.median(r[2] for r in rows)
        print(
            f"{mode:5s} c={level:2d} p50 {p50:.3f} ms  thr {throughput:7.0f}/s  cpu {cpu:6.0f} "
            f"us/call   cpu rounds {[round(r[2]) for r in rows]}"
        )


if __name__ == "__main__":
    main()
