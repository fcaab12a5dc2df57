"""benchmarks.perf_analyzer_run: a run that finds no stable window is tried once more, looser."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchmarks import perf_analyzer_run

# A stand-in perf_analyzer: unstable within 10 %, a report within 50 % (or always unstable).
FAKE = """#!{python}
import sys
args = sys.argv[1:]
report = args[args.index("-f") + 1]
stability = [a for a in args if a.startswith("--stability-percentage=")][0].split("=")[1]
open(report + ".calls", "a").write(stability + "\\n")
if stability != "50" or {always_unstable}:
    print("Failed to obtain stable measurement within 10 measurement windows")
    sys.exit(2)
open(report, "w").write(
    "Concurrency,Inferences/Second,p50 latency,p90 latency,p95 latency,p99 latency\\n"
    "4,1000,500,600,700,800\\n"
)
"""


def _fake(tmp_path: Path, always_unstable: bool) -> Path:
    exe = tmp_path / "perf_analyzer"
    exe.write_text(FAKE.format(python=sys.executable, always_unstable=always_unstable))
    os.chmod(exe, 0o755)
    return exe


def test_an_unstable_run_is_tried_once_more_at_the_loose_criterion_and_says_so(tmp_path, capsys):
    exe = _fake(tmp_path, always_unstable=False)
    row = perf_analyzer_run.run_one(exe, "localhost:1", "m", 4, 100, 10.0, tmp_path)
    assert (tmp_path / "m-c4.csv.calls").read_text().split() == ["10", "50"]
    assert row["throughput_infer_per_s"] == 1000 and row["p99_ms"] == 0.8
    assert row["stability_percentage"] == perf_analyzer_run.LOOSE_STABILITY
    perf_analyzer_run.print_table("m", [row])
    assert "(stable within 50 %)" in capsys.readouterr().out


def test_a_run_unstable_at_both_criteria_stays_a_failure(tmp_path):
    exe = _fake(tmp_path, always_unstable=True)
    row = perf_analyzer_run.run_one(exe, "localhost:1", "m", 4, 100, 10.0, tmp_path)
    assert (tmp_path / "m-c4.csv.calls").read_text().split() == ["10", "50"]
    assert "Failed to obtain stable measurement" in row["error"]
