"""warmserve at c=1 over several fresh lives: p50, the tree's CPU per call, and on which vCPU the
serving loop and the worker were last seen (sampled every 10 ms while the load runs).

    PYTHONPATH=. python fresh_c1.py LIVES SECONDS
"""

from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks import loadgen, proctree
from benchmarks.compare import MODEL
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

Placement = tuple[int, tuple[int, ...]]  # (the loop's vCPU, each worker's vCPU)


def last_cpu(pid: int, tid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[36])


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in found.split()]


def sample(
    pid: int, workers: list[int], stop: threading.Event, out: collections.Counter[Placement]
) -> None:
    while not stop.is_set():
        out[(last_cpu(pid, pid), tuple(last_cpu(w, w) for w in workers))] += 1
        stop.wait(0.01)


def one_life(root: Path, index: int, seconds: float) -> str:
    server = ServerProcess(root / f"w{index}.log", root / "repo")
    try:
        wait_until(server.ready_over_http, 300, "ready")
        loadgen.run(server.url, MODEL, concurrency=4, seconds=1.0)
        pid = server.process.pid
        workers = [w for template in children(pid) for w in children(template)]
        seen: collections.Counter[Placement] = collections.Counter()
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(pid, workers, stop, seen))
        sampler.start()
        t0 = proctree.tree_cpu_seconds(pid)
        result = loadgen.run(server.url, MODEL, concurrency=1, seconds=seconds)
        t1 = proctree.tree_cpu_seconds(pid)
        stop.set()
        sampler.join()
    finally:
        server.stop()
    same = sum(n for (loop, w), n in seen.items() if loop in w) / max(1, sum(seen.values()))
    cpu = (t1 - t0) / max(1, result.count) * 1e6
    return (
        f"start {index}: p50 {result.summary()['p50_ms']:.3f} cpu {cpu:.0f} us  "
        f"loop/worker same cpu {same:.0%}  {seen.most_common(3)}"
    )


def main() -> None:
    lives, seconds = int(sys.argv[1]), float(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        for index in range(lives):
            print(one_life(root, index, seconds), flush=True)


if __name__ == "__main__":
    main()
