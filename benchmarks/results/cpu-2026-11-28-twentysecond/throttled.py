"""warmserve under a CPU limit (a pod's CFS quota): the serving tree runs in a cgroup-v1 cpu group
with QUOTA CPUs per 100 ms period, the client outside it. Checkouts are alternated round by round
(SIDES, names of CHECKOUTS; each a git worktree with its gRPC stubs). Needs root and a writable
/sys/fs/cgroup/cpu.

    SIDES="head new" PYTHONPATH=. python .../throttled.py ROUNDS QUOTA LEVEL...  (cN or rN)
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

GROUP = Path("/sys/fs/cgroup/cpu/warmserve-throttled")
SECONDS = 4.0
CHECKOUTS = {
    "base": Path("/tmp/w22/wt-6ac40e1"),  # 6ac40e1: holds by the loop's CPU time alone
    "head": Path("/tmp/w22/wt-380a9c7"),  # 380a9c7: or by CPU time plus run-queue wait
    "new": Path(__file__).parents[3],  # the working tree: or when the quota throttled it
}
SIDES = tuple(os.environ.get("SIDES", "head new").split())
FIGURES = ("calls/s", "p50", "p99", "rows/batch", "loop cpu", "loop wait", "throttled")


def throttled_ns() -> int:
    for line in (GROUP / "cpu.stat").read_text().splitlines():
        if line.startswith("throttled_time"):
            return int(line.split()[1])
    raise RuntimeError("no throttled_time in cpu.stat")


def schedstat(pid: int) -> tuple[int, int]:
    run, wait, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(run), int(wait)


def rows_and_batches(server: ServerProcess) -> tuple[float, float]:
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return batch_rows(answer.read().decode())


def measure(server: ServerProcess, level: str) -> tuple[float, ...]:
    value = float(level[1:])
    pid = server.process.pid
    throttled0, (run0, wait0) = throttled_ns(), schedstat(pid)
    rows0, batches0 = rows_and_batches(server)
    start = time.monotonic()
    if level.startswith("c"):
        result = loadgen.run(server.url, MODEL, concurrency=int(value), seconds=SECONDS)
    else:
        result = loadgen.run(server.url, MODEL, rate=value, seconds=SECONDS)
    wall = (time.monotonic() - start) * 1e9
    throttled1, (run1, wait1) = throttled_ns(), schedstat(pid)
    rows1, batches1 = rows_and_batches(server)
    summary = result.summary()
    if result.errors:
        print(f"    {result.errors} errors", flush=True)
    return (
        result.throughput,
        summary["p50_ms"],
        summary["p99_ms"],
        (rows1 - rows0) / max(batches1 - batches0, 1),
        (run1 - run0) / wall,
        (wait1 - wait0) / wall,
        (throttled1 - throttled0) / wall,  # summed over the CPUs' run queues
    )


def show(prefix: str, row: tuple[float, ...]) -> str:
    return (
        f"{prefix} {row[0]:6.0f}/s p50 {row[1]:7.2f} p99 {row[2]:7.2f} ms rows/batch"
        f" {row[3]:5.2f} loop cpu {row[4]:.2f} wait {row[5]:.2f} throttled {row[6]:.2f}"
    )


def main() -> None:
    rounds, quota, levels = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
    GROUP.mkdir(exist_ok=True)
    (GROUP / "cpu.cfs_period_us").write_text("100000")
    (GROUP / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            build_mlp_onnx(root / "repo" / MODEL)
            for index in range(rounds):
                for side in SIDES if index % 2 == 0 else SIDES[::-1]:
                    log = root / f"{side}{index}.log"
                    server = ServerProcess(log, root / "repo", (), cwd=CHECKOUTS[side])
                    # (before it forks its workers, which start seconds later)
                    (GROUP / "cgroup.procs").write_text(str(server.process.pid))
                    try:
                        wait_until(server.ready_over_http, 300, "the server ready")
                        loadgen.run(server.url, MODEL, concurrency=4, seconds=1.0)
                        for level in levels:
                            row = measure(server, level)
                            results.setdefault((level, side), []).append(row)
                            print(show(f"round {index} {side:4s} {level:6s}", row), flush=True)
                    finally:
                        server.stop()
                    found = [line for line in server.log().splitlines() if "CPU limit" in line]
                    print(f"    {side}: {found[0].split(': ', 1)[1] if found else '-'}")
    finally:
        GROUP.rmdir()
    print(f"\nmedians of {rounds} rounds, quota {quota} CPU per 100 ms period")
    for level in levels:
        for side in SIDES:
            rows = results[(level, side)]
            medians = tuple(statistics.median(r[i] for r in rows) for i in range(len(FIGURES)))
            print(show(f"{level:6s} {side:4s}", medians))


if __name__ == "__main__":
    main()
