"""Context switches per call (voluntary and not, from /proc) of every thread of each server's
tree at one closed-loop concurrency: the floor, the hop floor and warmserve, in turn.

    PYTHONPATH=. python .../switches.py CONCURRENCY
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import loadgen
from benchmarks.compare import MODEL, FloorProcess
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

SECONDS = 4.0
SHOWN = 0.05  # threads with fewer switches per call are not printed


def switches(pid: int) -> dict[tuple[str, str], tuple[int, int]]:
    """(thread id, name) → (voluntary, involuntary) switches so far, for ``pid``'s threads."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        voluntary = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        involuntary = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        out[(task.name, (task / "comm").read_text().strip())] = (voluntary, involuntary)
    return out


def main() -> None:
    concurrency = int(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        floor = FloorProcess(root / "repo" / MODEL, root / "floor.log")
        hop = FloorProcess(root / "repo" / MODEL, root / "hop.log", hop=True)
        served = ServerProcess(root / "warmserve.log", root / "repo", ())
        try:
            wait_until(served.ready_over_http, 300, "warmserve ready")
            for name, server in (("floor", floor), ("hop", hop), ("warmserve", served)):
                loadgen.run(server.url, MODEL, concurrency=concurrency, seconds=1.0)
                pid = server.process.pid
                if server is served:
                    pids = [pid, *served.worker_pids()]
                else:
                    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True)
                    pids = [pid, *map(int, found.stdout.split())]
                before = {p: switches(p) for p in pids}
                result = loadgen.run(server.url, MODEL, concurrency=concurrency, seconds=SECONDS)
                total = 0.0
                for p in pids:
                    for key, (voluntary, involuntary) in switches(p).items():
                        v0, i0 = before[p].get(key, (0, 0))
                        v, i = (voluntary - v0) / result.count, (involuntary - i0) / result.count
                        total += v + i
                        if v + i > SHOWN:
                            counts = f"voluntary {v:5.2f} not {i:5.2f}"
                            print(f"  {name:9s} pid {p} {key[1]:16s} {counts}")
                print(f"{name}: {total:.2f} switches per call over {result.count} calls")
        finally:
            served.stop()
            hop.stop()
            floor.stop()


if __name__ == "__main__":
    main()
