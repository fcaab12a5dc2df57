"""Whole-server behaviour: graceful SIGTERM, a killed worker, the built-in demo repository."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serve.testing.models import build_mlp_onnx, build_spin_torch, mlp_reference
from tests.integration.conftest import spin_inputs
from tests.integration.harness import ServerProcess, free_port, wait_until


def _mlp_input(x: np.ndarray) -> list[triton.InferInput]:
    tensor = triton.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


@pytest.fixture()
def small_repository(tmp_path):
    build_mlp_onnx(tmp_path / "repo" / "mlp_onnx")
    build_spin_torch(tmp_path / "repo" / "spin")
    return tmp_path / "repo"


@pytest.mark.parametrize("frontends", [1, 2])  # 2: the calls come through relay processes
def test_sigterm_finishes_calls_in_flight_then_refuses_new_ones(
    tmp_path, small_repository, frontends
):
    server = ServerProcess(
        tmp_path / "server.log",
        small_repository,
        args=("--log-level", "DEBUG", "--grace-period", "30", "--frontends", str(frontends)),
    )
    try:
        server.wait_ready()
        client = server.client
        client.infer("spin", spin_inputs(10))
        results: queue.Queue = queue.Queue()
        for value in (1.0, 2.0, 3.0):  # one computing, two queued behind it
            client.async_infer(
                "spin", spin_inputs(3000, value), lambda result, error: results.put((result, error))
            )
        server.wait_for_log_count("model spin: dispatching", 2)
        # one computes (sent straight to the idle worker), two wait in the queue
        server.wait_for_log("model spin: 2 requests wait for a worker")
        server.terminate()
        server.wait_for_log("shutting down")
        outcomes = [results.get(timeout=60) for _ in range(3)]
        assert all(error is None for _, error in outcomes), [str(e) for _, e in outcomes]
        assert sorted(r.as_numpy("Y")[0, 0] for r, _ in outcomes) == [1.0, 2.0, 3.0]
        with pytest.raises(triton.InferenceServerException) as caught:
            client.infer("mlp_onnx", _mlp_input(np.zeros((1, 64), np.float32)), client_timeout=5)
        assert "UNAVAILABLE" in str(caught.value.status())
        server.process.wait(60)
        assert server.process.returncode == 0
        assert "model spin: 1 workers stopped" in server.log()  # (it counts them, gone or not)
    finally:
        server.stop()


def test_a_killed_worker_is_replaced_and_the_model_serves_again(tmp_path, small_repository):
    server = ServerProcess(tmp_path / "server.log", small_repository)
    try:
        server.wait_ready()
        before = set(server.worker_pids())
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        server.wait_for_log("lost: ")
        wait_until(
            lambda: (
                len(set(server.worker_pids()) - before) == 1 and server.client.is_server_ready()
            ),
            60,
            "a replacement worker",
        )
        x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
        got = server.client.infer("mlp_onnx", _mlp_input(x)).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
        assert victim not in server.worker_pids()
    finally:
        assert server.stop() == 0


def test_serve_without_a_repository_builds_and_serves_the_demo_models(tmp_path):
    server = ServerProcess(
        tmp_path / "server.log", env={"WARMSERVE_CACHE_DIR": str(tmp_path / "cache")}
    )
    try:
        server.wait_ready(timeout=300)
        names = sorted(m.name for m in server.client.get_model_repository_index().models)
        assert names == ["image_cnn", "mlp_onnx", "mlp_torch"]
        assert any((tmp_path / "cache").glob("demo-bundles-*/mlp_onnx/1/manifest.json"))
        response = server.client.infer("mlp_torch", _mlp_input(np.ones((1, 64), np.float32)))
        assert len(response.get_response().parameters["bundle_id"].string_param) == 64
        x = np.ones((1, 64), np.float32)
        got = server.client.infer("mlp_torch", _mlp_input(x)).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
    finally:
        assert server.stop() == 0


def test_workers_fork_from_a_template_and_spawn_when_it_is_gone(tmp_path, small_repository):
    server = ServerProcess(tmp_path / "server.log", small_repository)
    try:
        server.wait_ready()
        templates = server.template_pids()
        assert len(templates) == 2  # one per model: mlp_onnx, spin
        assert len(server.worker_pids()) == 2
        assert server.log().count("forked from the template") == 2
        for template in templates:
            os.kill(template, signal.SIGKILL)
        wait_until(lambda: not server.template_pids(), 30, "the templates to die")
        assert server.client.is_server_ready()  # workers outlive their template
        x = np.ones((1, 64), np.float32)
        got = server.client.infer("mlp_onnx", _mlp_input(x)).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
        old = set(server.worker_pids())  # the orphaned workers are no longer found as ours
        (victim,) = _workers_of(server, "mlp_onnx")
        os.kill(victim, signal.SIGKILL)
        server.wait_for_log(r"worker mlp_onnx#2 spawned")
        wait_until(server.client.is_server_ready, 60, "the spawned replacement")
        assert len(set(server.worker_pids()) - old) == 1
    finally:
        assert server.stop() == 0


def _workers_of(server: ServerProcess, model: str) -> list[int]:
    """Pids of ``model``'s workers, from the server's log lines."""
    return [
        int(pid)
        for pid in re.findall(rf"worker {model}#\d+ \S+ [a-z ]*\(pid (\d+)\)", server.log())
    ]


def test_sigterm_with_a_drain_delay_goes_not_serving_first_and_keeps_serving(tmp_path):
    build_mlp_onnx(tmp_path / "repo" / "mlp_onnx")
    health_port = free_port()
    server = ServerProcess(
        tmp_path / "server.log",
        tmp_path / "repo",
        args=("--drain-delay", "30", "--health-port", str(health_port)),
    )
    health_url = f"127.0.0.1:{health_port}"
    try:
        server.wait_ready()
        assert server.health("readiness", url=health_url) == "SERVING"
        assert server.health("mlp_onnx", url=health_url) == "SERVING"
        # the health port serves health only
        with grpc.insecure_channel(health_url) as channel, pytest.raises(grpc.RpcError) as caught:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                service_pb2.ServerLiveRequest(), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        server.terminate()
        server.wait_for_log("draining for 30.0 s")
        assert server.health("", url=health_url) == "NOT_SERVING"
        assert server.health("liveness", url=health_url) == "SERVING"
        assert not server.client.is_server_ready()
        assert server.http_get("/v2/health/ready") == 503
        x = np.ones((1, 64), np.float32)
        got = server.client.infer("mlp_onnx", _mlp_input(x)).as_numpy("OUTPUT0")  # still served
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
    finally:
        server.process.kill()  # not waiting out the 30 s drain
        server.stop()


def test_sigterm_with_a_batch_that_outlasts_the_grace_period_exits_within_the_budget(
    tmp_path, small_repository
):
    # A batch that will not finish (a hung GPU, say) must not hold the shutdown past the
    # server's budget: its caller is cancelled after the grace period and its worker is stopped
    # (killed after the stop timeout). The kubelet's SIGKILL comes at the budget + 10 s.
    from serve.app import shutdown_budget_s
    from serve.config import ServerConfig

    server = ServerProcess(
        tmp_path / "server.log",
        small_repository,
        args=("--grace-period", "1", "--log-level", "DEBUG"),
    )
    try:
        server.wait_ready()
        results: queue.Queue = queue.Queue()
        server.client.async_infer(
            "spin", spin_inputs(10**9), lambda result, error: results.put((result, error))
        )
        server.wait_for_log("model spin: dispatching")
        server.terminate()
        # (a timeout, not a timing: before the fix the batcher held the shutdown for 60 s)
        server.process.wait(shutdown_budget_s(ServerConfig(grace_period_s=1.0)) + 5)
        assert server.process.returncode == 0
        _, error = results.get(timeout=10)
        assert error is not None  # the call was cancelled, not left hanging
        log = server.log()
        assert "shutting down within 16 s" in log
        assert "model spin: 1 batches still running at stop" in log
        assert "did not exit within 10 s; killing it" in log
    finally:
        server.stop()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_spinning_serving_loop_answers_every_call_and_rests_when_idle(tmp_path):
    # WARMSERVE_LOOP_SPIN (an experiment for GPU hosts): the loop polls while a batch is out
    build_mlp_onnx(tmp_path / "repo" / "mlp_onnx")
    server = ServerProcess(
        tmp_path / "server.log", tmp_path / "repo", env={"WARMSERVE_LOOP_SPIN": "1"}
    )
    try:
        server.wait_ready()
        assert "WARMSERVE_LOOP_SPIN: the serving loop polls" in server.log()
        rng = np.random.default_rng(7)
        for _ in range(50):
            x = rng.standard_normal((1 + rng.integers(4), 64)).astype(np.float32)
            got = server.client.infer("mlp_onnx", _mlp_input(x)).as_numpy("OUTPUT0")
            np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
        # Idle, it must not go on spinning: over a second, far less than a second of CPU (a
        # measurement over an interval, not a wait for something to happen).
        before, start = _cpu_seconds(server.process.pid), time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            server.process.wait(timeout=1.0)  # idle for a second (and the server stays up)
        used = _cpu_seconds(server.process.pid) - before
        assert used < 0.5 * (time.monotonic() - start), f"{used:.2f} s of CPU while idle"
    finally:
        assert server.stop() == 0


def test_a_worker_busy_in_the_model_exits_when_the_serving_process_is_killed(
    tmp_path, small_repository
):
    # Outside a container nothing else ends it: a hung or long batch would keep the worker
    # (and its GPU memory) alive for good after `kill -9` of the server.
    from tests.integration.test_frontends import alive, iterations_for

    server = ServerProcess(tmp_path / "server.log", small_repository, args=("--log-level", "DEBUG"))
    workers: list[int] = []
    try:
        server.wait_ready()
        workers = server.worker_pids()
        long = iterations_for(server, 120.0)  # two minutes of compute
        dispatched = server.count_log("model spin: dispatching")
        server.client.async_infer("spin", spin_inputs(long), lambda result, error: None)
        server.wait_for_log_count("model spin: dispatching", dispatched + 1)  # it computes
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        wait_until(lambda: not any(alive(p) for p in workers), 30, "every worker gone")
    finally:
        for pid in workers:  # (if the test failed: leave nothing computing behind)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        server.stop()


def test_a_repository_with_nothing_to_serve_never_turns_ready_and_says_so(tmp_path):
    # (a bundle refused, or no model at all: no inference can run, so readiness stays shut)
    broken = tmp_path / "repo" / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{}")
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_live()
        server.wait_for_log(r"start-up over, NOT ready: no model in the repository")
        assert server.http_get("/v2/health/ready") == 503
        assert not server.client.is_server_ready()
    finally:
        assert server.stop() == 0
