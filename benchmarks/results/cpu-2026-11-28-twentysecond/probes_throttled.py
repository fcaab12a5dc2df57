"""A server with a latency budget under a CPU limit: its tree in a cgroup-v1 cpu group with
QUOTA CPUs per 100 ms period, open-loop load at RATE calls/s for SECONDS, the MLP with
``latency_budget_ms`` = BUDGET and 2 workers; prints the client's figures, the server's latency
report, and its log lines about probes, replacements and the CPU limit. Needs root and a
writable /sys/fs/cgroup/cpu.

    PYTHONPATH=. python .../probes_throttled.py QUOTA RATE SECONDS BUDGET
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from pathlib import Path

from benchmarks import loadgen
from benchmarks.compare import MODEL
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

GROUP = Path("/sys/fs/cgroup/cpu/warmserve-probes")
SAID = ("over the", "failed its probe", "replac", "CPU limit", "not counted", "not held")


def main() -> None:
    quota, rate, seconds, budget = (float(a) for a in sys.argv[1:5])
    GROUP.mkdir(exist_ok=True)
    (GROUP / "cpu.cfs_period_us").write_text("100000")
    (GROUP / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            build_mlp_onnx(root / "repo" / MODEL, latency_budget_ms=budget, pool={"workers": 2})
            server = ServerProcess(root / "server.log", root / "repo", ())
            (GROUP / "cgroup.procs").write_text(str(server.process.pid))
            try:
                wait_until(server.ready_over_http, 300, "the server ready")
                loadgen.run(server.url, MODEL, concurrency=4, seconds=1.0)
                result = loadgen.run(server.url, MODEL, rate=rate, seconds=seconds)
                summary = result.summary()
                print(
                    f"client: {result.throughput:.0f} calls/s, p50 {summary['p50_ms']:.2f} ms, "
                    f"p99 {summary['p99_ms']:.2f} ms, {result.errors} errors"
                )
                url = f"http://127.0.0.1:{server.http_port}/warmserve/models/{MODEL}/latency"
                with urllib.request.urlopen(url, timeout=10) as answer:
                    report = json.loads(answer.read())
                report.pop("breakdown_us", None)
                print("server:", json.dumps(report))
            finally:
                server.stop()
            for line in server.log().splitlines():
                if any(words in line for words in SAID):
                    print("  ", line)
    finally:
        GROUP.rmdir()


if __name__ == "__main__":
    main()
