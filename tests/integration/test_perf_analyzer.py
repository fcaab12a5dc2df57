"""Triton's own load generator drives warmserve unmodified (skipped where it is not installed)."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

PERF_ANALYZER = Path(__file__).resolve().parents[2] / "benchmarks" / ".tools" / "perf_analyzer"


@pytest.mark.skipif(
    not PERF_ANALYZER.exists(),
    reason="perf_analyzer not installed: run `bash benchmarks/install_perf_analyzer.sh`",
)
@pytest.mark.parametrize(
    ("model", "mode"),
    [("mlp_onnx", []), ("image_cnn", []), ("mlp_onnx", ["--streaming"])],
    ids=["mlp_onnx", "image_cnn", "mlp_onnx-streaming"],
)
def test_perf_analyzer_runs_against_a_demo_model(server, tmp_path, model, mode):
    report = tmp_path / "report.csv"
    command = [str(PERF_ANALYZER), "-m", model, "-i", "grpc", "-u", server.url, *mode]
    command += ["--concurrency-range", "2:2", "--measurement-mode", "count_windows"]
    command += ["--measurement-request-count", "50", "--stability-percentage", "100"]
    command += ["--max-trials", "3", "-f", str(report)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    (row,) = list(csv.DictReader(report.open()))
    assert float(row["Inferences/Second"]) > 0
    assert "Successful request count" in run.stdout
