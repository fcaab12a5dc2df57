"""The serving process's garbage collections and the workers' memory with WARMSERVE_GC_FREEZE on
and off (rounds alternated): the MLP (ONNX or TorchScript) with 2 workers, c=1 and c=16 for
SECONDS each; throughput, p50 / p99 / max latency, the serving process's full (gen2) collections
(gcprobe/sitecustomize.py), and each process's private dirty memory, RSS and PSS after the load.

    PYTHONPATH=. python .../gc_freeze_ab.py OUT_FOLDER ROUNDS onnx|torch
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import loadgen
from benchmarks.compare import MODEL
from serve.testing.models import build_mlp_onnx, build_mlp_torch
from tests.integration.harness import ServerProcess, wait_until

SECONDS = 10
PROBE = Path(__file__).parent / "gcprobe"


def tree(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += tree(int(child))
    return found


def memory_mib(pid: int) -> tuple[float, float, float]:
    """Private dirty, RSS and PSS of ``pid`` (smaps_rollup), MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        fields[line.split(":")[0]] = int(line.split()[1])
    return fields["Private_Dirty"] / 1024, fields["Rss"] / 1024, fields["Pss"] / 1024


def command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:60]


def collections(server: ServerProcess, folder: Path) -> str:
    """The serving process's collections since the last call (its probe starts afresh)."""
    os.kill(server.process.pid, signal.SIGUSR2)
    path = folder / f"{server.process.pid}.txt"
    wait_until(path.exists, 10, "the probe's summary")
    time.sleep(0.2)  # (the file is written at once; let the write finish)
    text = path.read_text()
    path.unlink()
    return text


def main() -> None:
    out, rounds, backend = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    results: dict[tuple[int, str], list[tuple[float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build = build_mlp_torch if backend == "torch" else build_mlp_onnx
        build(root / "repo" / MODEL, name=MODEL, pool={"workers": 2, "threads": 1})
        for index in range(rounds):
            for side in ("on", "off") if index % 2 == 0 else ("off", "on"):
                folder = out / f"{side}{index}"
                folder.mkdir(parents=True, exist_ok=True)
                env = {
                    "WARMSERVE_GC_FREEZE": "1" if side == "on" else "0",
                    "GCPROBE_DIR": str(folder),
                    "PYTHONPATH": f"{PROBE}:{os.environ.get('PYTHONPATH', '')}",
                }
                server = ServerProcess(root / f"{side}{index}.log", root / "repo", (), env=env)
                try:
                    wait_until(server.ready_over_http, 300, "ready")
                    loadgen.run(server.url, MODEL, concurrency=4, seconds=1)
                    collections(server, folder)  # (start-up's and the warm-up's: not counted)
                    for level in (1, 16):
                        load = loadgen.run(server.url, MODEL, concurrency=level, seconds=SECONDS)
                        text = collections(server, folder)
                        (folder / f"c{level}.txt").write_text(text)
                        full = [line for line in text.splitlines() if line.startswith("gen2")]
                        row = (load.throughput, load.p50_ms, load.p99_ms, load.max_ms)
                        results.setdefault((level, side), []).append(row)
                        print(
                            f"round {index} {side:3s} c={level:2d} {row[0]:6.0f}/s p50 {row[1]:.2f}"
                            f" p99 {row[2]:.2f} max {row[3]:.2f} ms |"
                            f" {full[0] if full else 'gen2: none'}",
                            flush=True,
                        )
                    for pid in tree(server.process.pid)[1:]:
                        dirty, rss, pss = memory_mib(pid)
                        print(
                            f"    {command(pid):60s} private dirty {dirty:6.1f} MiB"
                            f" rss {rss:6.1f} pss {pss:6.1f}"
                        )
                finally:
                    server.stop()
                frozen = [line for line in server.log().splitlines() if "frozen" in line]
                print("    " + "; ".join(line.split("] ")[-1] for line in frozen[:3]))
    print("\nmedians")
    for (level, side), rows in sorted(results.items()):
        medians = [statistics.median(row[i] for row in rows) for i in range(4)]
        print(
            f"c={level:2d} {side:3s} {medians[0]:6.0f}/s p50 {medians[1]:.2f} p99 {medians[2]:.2f}"
            f" max {medians[3]:.2f} ms (max by round: {', '.join(f'{r[3]:.1f}' for r in rows)})"
        )


if __name__ == "__main__":
    main()
