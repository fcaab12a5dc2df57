"""The benchmark tools themselves, run as their own processes (they import the project's
generated stubs, which must not share a process with tritonclient's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import free_port

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_the_load_generator_splits_a_closed_loop_over_client_processes(server):
    run = _run(
        "benchmarks.loadgen", "--url", server.url, "--model", "mlp_onnx",
        "--concurrency", "5", "--seconds", "0.5", "--processes", "2", "--connections", "2",
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["errors"] == 0 and result["level"] == 5
    assert result["count"] > 0 and result["throughput"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]


def test_the_load_generator_can_send_its_calls_on_streams(server):
    def streamed(model: str) -> dict:
        run = _run(
            "benchmarks.loadgen", "--url", server.url, "--model", model, "--streaming",
            "--concurrency", "3", "--seconds", "0.5", "--processes", "2", timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    good = streamed("mlp_onnx")
    assert good["errors"] == 0 and good["count"] > 0
    assert 0 < good["p50_ms"] <= good["p99_ms"]
    bad = streamed("nope")  # each answer an error_message; the streams go on
    assert bad["count"] == 0 and bad["errors"] > 3


def test_the_ab_tool_serves_a_commit_beside_the_working_tree_and_compares_them():
    run = _run(
        "benchmarks.ab", "HEAD", "--rounds", "1", "--seconds", "0.3", "--concurrency", "1",
        "--rates", "200", timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "c=1: 1 rounds" in run.stdout and "r=200: 1 rounds" in run.stdout  # (closed, open)
    lines = [line for line in run.stdout.splitlines() if "new/base median" in line]
    assert len(lines) == 10  # per level: calls/s, p50, p99, tree and loop CPU per call
    assert all(float(line.split("median ")[1].split()[0]) > 0 for line in lines)
    worktrees = subprocess.run(
        ["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "/base " not in worktrees  # the base's checkout is gone again


def test_a_client_process_that_cannot_connect_fails_the_run_with_its_reason():
    run = _run(
        "benchmarks.loadgen", "--url", f"127.0.0.1:{free_port()}", "--concurrency", "2",
        "--seconds", "0.5", "--processes", "2", timeout=180,
    )  # fmt: skip
    assert run.returncode != 0
    assert "client process failed" in run.stderr and "UNAVAILABLE" in run.stderr


@pytest.mark.timeout(300)  # about 55 s on an idle 2-vCPU VM, 140 s beside other load
def test_the_gpu_benchmark_script_runs_end_to_end_on_cpu(tmp_path):
    """The script that only a lent GPU machine runs for real, on tiny models and loads here, so
    it cannot rot unseen between GPU sessions."""
    run = _run(
        "benchmarks.gpu_bench", "--smoke", "--device", "cpu", "--out", str(tmp_path),
        "--workers", "1", "--seconds", "0.3", timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    for model in ("resnet50", "encoder", "resnet50_one_slot"):
        rows = results["served"][model]
        assert rows and all(r["count"] > 0 and r["errors"] == 0 for r in rows), rows
        assert results["served"]["first_request"][model]["first_ms"] > 0
    for model in ("resnet50", "encoder"):  # the lowest and highest level again, streamed
        rows = results["served"][f"{model}_streamed"]
        assert [r["level"] for r in rows] == [1, 16]
        assert all(r["count"] > 0 and r["errors"] == 0 for r in rows), rows
        assert all(r["rows_per_batch"] >= 1 for r in rows), rows  # the batches streams formed
    assert {t["model"] for t in results["targets"]} == {"resnet50", "encoder", "resnet50_one_slot"}
    streamed = {t["model"]: t["streamed"] for t in results["targets"] if "streamed" in t}
    assert set(streamed) == {"resnet50", "encoder"}
    assert all(t["throughput_over_floor"] > 0 and t["c1_p50_ms"] > 0 for t in streamed.values())
    floor = results["grpc_floor"]
    assert all(r["count"] > 0 and r["errors"] == 0 for rows in floor.values() for r in rows)
    assert (tmp_path / "gpu_bench_server.log").exists()
    for count in ("1", "2"):  # ResNet-50 through one and two front-end processes
        rows = results["frontends"][count]
        assert rows and all(r["count"] > 0 and r["errors"] == 0 for r in rows), rows
        assert all(r["rows_per_batch"] >= 1 for r in rows), rows
    assert [t["frontends"] for t in results["frontend_targets"]] == [1, 2]


def test_the_image_sized_model_of_relay_cost_returns_each_images_first_bytes(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from benchmarks.relay_cost import IMAGE_SHAPE, build_image_passthrough

    build_image_passthrough(tmp_path / "image_passthrough")
    session = ort.InferenceSession(
        str(tmp_path / "image_passthrough" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    images = np.random.default_rng(3).integers(0, 256, (3, *IMAGE_SHAPE), dtype=np.uint8)
    (logits,) = session.run(None, {"IMAGE": images})
    assert logits.dtype == np.float32 and logits.shape == (3, 1000)
    np.testing.assert_array_equal(logits, images.reshape(3, -1)[:, :1000].astype(np.float32))


def test_the_wake_up_probe_times_round_trips_after_each_idle_gap(tmp_path):
    out = tmp_path / "wakeup.json"
    run = _run(
        "benchmarks.wakeup", "--gaps-us", "0,100", "--count", "20", "--out", str(out), timeout=60
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["gap_us"] for r in rows] == [0, 100]
    for r in rows:
        for mode in ("sleeps", "spins"):
            assert 0 < r[f"{mode}_p50_us"] <= r[f"{mode}_p95_us"], r
        assert r["wake_cost_p50_us"] == r["sleeps_p50_us"] - r["spins_p50_us"]
    assert "wake-up cost" in run.stdout
    refused = _run("benchmarks.wakeup", "--gaps-us", "-5", timeout=60)
    assert refused.returncode == 2 and "zero or more" in refused.stderr
