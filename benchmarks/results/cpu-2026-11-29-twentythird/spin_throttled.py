"""Workers' idle spin under a CPU limit (a pod's CFS quota): the MLP with 2 workers that poll for
up to SPIN_US after each batch (pool.idle_spin_us; on CUDA devices the default), the serving
tree in a cgroup-v1 cpu group with QUOTA CPUs per 100 ms period and a cpuacct group that counts
its CPU time, the client outside both. Sides, alternated round by round:

- ``head``: the last commit before the change (a git worktree with its gRPC stubs), spinning;
- ``new``: the working tree, spinning (its workers pause the spin while the quota throttles);
- ``nospin``: the working tree with idle_spin_us 0 (the reference: no polling at all).

``SIDES="new nospin"`` runs only those. Needs root and writable /sys/fs/cgroup/cpu and
/sys/fs/cgroup/cpuacct.

    PYTHONPATH=. python .../spin_throttled.py ROUNDS QUOTA LEVEL...  (cN or rN)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks import loadgen
from benchmarks.compare import MODEL, batch_rows
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

CPU_GROUP = Path("/sys/fs/cgroup/cpu/warmserve-spin")
ACCT_GROUP = Path("/sys/fs/cgroup/cpuacct/warmserve-spin")
SECONDS = 4.0
SPIN_US = 2000
WORKERS = 2
HEAD = Path(os.environ.get("HEAD_CHECKOUT", "/tmp/w23/wt-1f8097b"))
NEW = Path(__file__).parents[3]
SIDES = {"head": (HEAD, SPIN_US), "new": (NEW, SPIN_US), "nospin": (NEW, 0)}
FIGURES = ("calls/s", "p50", "p99", "cpu/call", "throttled", "rows/batch")
ONLY = tuple(os.environ.get("SIDES", " ".join(SIDES)).split())


def throttled_ns() -> int:
    for line in (CPU_GROUP / "cpu.stat").read_text().splitlines():
        if line.startswith("throttled_time"):
            return int(line.split()[1])
    raise RuntimeError("no throttled_time in cpu.stat")


def usage_ns() -> int:
    return int((ACCT_GROUP / "cpuacct.usage").read_text())


def rows_and_batches(server: ServerProcess) -> tuple[float, float]:
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return batch_rows(answer.read().decode())


def measure(server: ServerProcess, level: str) -> tuple[float, ...]:
    value = float(level[1:])
    throttled0, used0 = throttled_ns(), usage_ns()
    rows0, batches0 = rows_and_batches(server)
    start = time.monotonic()
    if level.startswith("c"):
        result = loadgen.run(server.url, MODEL, concurrency=int(value), seconds=SECONDS)
    else:
        result = loadgen.run(server.url, MODEL, rate=value, seconds=SECONDS)
    wall = (time.monotonic() - start) * 1e9
    throttled1, used1 = throttled_ns(), usage_ns()
    rows1, batches1 = rows_and_batches(server)
    summary = result.summary()
    if result.errors:
        print(f"    {result.errors} errors", flush=True)
    return (
        result.throughput,
        summary["p50_ms"],
        summary["p99_ms"],
        (used1 - used0) / 1e3 / max(result.count, 1),  # µs of the tree's CPU per call
        (throttled1 - throttled0) / wall,  # summed over the CPUs' run queues
        (rows1 - rows0) / max(batches1 - batches0, 1),
    )


def show(prefix: str, row: tuple[float, ...]) -> str:
    return (
        f"{prefix} {row[0]:6.0f}/s p50 {row[1]:7.2f} p99 {row[2]:7.2f} ms"
        f" cpu/call {row[3]:6.0f} µs throttled {row[4]:.2f} rows/batch {row[5]:5.2f}"
    )


def main() -> None:
    rounds, quota, levels = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
    CPU_GROUP.mkdir(exist_ok=True)
    ACCT_GROUP.mkdir(exist_ok=True)
    (CPU_GROUP / "cpu.cfs_period_us").write_text("100000")
    (CPU_GROUP / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    names = ONLY
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for name, (_, spin_us) in SIDES.items():
                pool = {"workers": WORKERS, "threads": 1, "idle_spin_us": spin_us}
                build_mlp_onnx(root / name / MODEL, pool=pool)
            for index in range(rounds):
                for name in names if index % 2 == 0 else names[::-1]:
                    checkout, _ = SIDES[name]
                    log = root / f"{name}{index}.log"
                    server = ServerProcess(log, root / name, (), cwd=checkout)
                    # (before it forks its workers, which start seconds later)
                    for group in (CPU_GROUP, ACCT_GROUP):
                        (group / "cgroup.procs").write_text(str(server.process.pid))
                    try:
                        wait_until(server.ready_over_http, 300, "the server ready")
                        loadgen.run(server.url, MODEL, concurrency=4, seconds=1.0)
                        for level in levels:
                            row = measure(server, level)
                            results.setdefault((level, name), []).append(row)
                            print(show(f"round {index} {name:6s} {level:6s}", row), flush=True)
                    finally:
                        server.stop()
                    paused = [line for line in server.log().splitlines() if "spin" in line]
                    for line in paused[:4]:
                        print(f"    {name}: {line.split('] ', 1)[-1]}")
    finally:
        CPU_GROUP.rmdir()
        ACCT_GROUP.rmdir()
    print(f"\nmedians of {rounds} rounds, quota {quota} CPU per 100 ms period")
    for level in levels:
        for name in names:
            rows = results[(level, name)]
            medians = tuple(statistics.median(r[i] for r in rows) for i in range(len(FIGURES)))
            print(show(f"{level:6s} {name:6s}", medians))


if __name__ == "__main__":
    main()
