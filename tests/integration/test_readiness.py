"""Readiness tells the truth: probes by real inference, gRPC health (Check and Watch) and the
HTTP endpoints agree, and the pool heals from killed, stopped and failing workers."""

from __future__ import annotations

import os
import queue
import signal
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.testing.models import build_mlp_onnx, build_mlp_torch, build_spin_torch, mlp_reference
from tests.integration.conftest import spin_inputs
from tests.integration.harness import CallerThreads, ServerProcess, wait_until

FAST_PROBES = {"interval_s": 0.3, "timeout_s": 1.0, "failures_to_replace": 1}


def _mlp_input(x: np.ndarray) -> list[triton.InferInput]:
    tensor = triton.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


class Load(CallerThreads):
    """Threads calling ``model`` with distinct inputs, checking every answer, until stopped."""

    def __init__(self, url: str, model: str, threads: int = 6, max_calls: int = 20000) -> None:
        super().__init__(url, threads, max_calls)
        self.model = model

    def call(self, client: triton.InferenceServerClient, seed: int, n: int) -> None:
        rng = np.random.default_rng(seed * 100000 + n)
        x = rng.standard_normal((1 + int(rng.integers(0, 3)), 64)).astype(np.float32)
        got = client.infer(self.model, _mlp_input(x), client_timeout=30).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)


def _serve(tmp_path, frontends: int = 1, **overrides) -> ServerProcess:
    build_mlp_onnx(tmp_path / "repo" / "mlp", name="mlp", **overrides)
    args = ("--frontends", str(frontends))
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo", args=args)
    server.wait_ready()
    return server


def _back_at_min_warm(server: ServerProcess, old: set[int], count: int) -> bool:
    pids = set(server.worker_pids())
    return len(pids) == count and not (old & pids) and server.health("mlp") == "SERVING"


def test_kill_9_under_load_loses_no_request_and_the_pool_returns_to_min_warm(tmp_path):
    server = _serve(tmp_path, pool={"workers": 2, "min_warm": 2, "threads": 1}, probe=FAST_PROBES)
    try:
        victim = server.worker_pids()[0]
        with Load(server.url, "mlp") as load:
            load.wait_for(300)
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: _back_at_min_warm(server, {victim}, 2), 60, "two warm workers")
            load.wait_for(300)
        assert load.errors == []
        assert server.http_get("/v2/models/mlp/ready") == 200
        assert "lost: " in server.log()
    finally:
        assert server.stop() == 0


def test_a_stopped_worker_is_killed_and_replaced_and_no_request_hangs(tmp_path):
    pool = {"workers": 2, "min_warm": 2, "threads": 1, "watchdog_s": 2.0}
    server = _serve(tmp_path, pool=pool, probe=FAST_PROBES)
    try:
        victim = server.worker_pids()[0]
        with Load(server.url, "mlp", threads=4) as load:
            load.wait_for(200)
            os.kill(victim, signal.SIGSTOP)
            wait_until(
                lambda: _back_at_min_warm(server, {victim}, 2), 60, "the stopped worker replaced"
            )
            load.wait_for(200)
        assert load.errors == []
        log = server.log()
        assert "hung" in log or "failed its probe" in log
    finally:
        if victim in server.worker_pids():
            os.kill(victim, signal.SIGCONT)
        assert server.stop() == 0


def test_a_model_whose_probe_fails_is_not_serving_while_others_are(tmp_path):
    repo = tmp_path / "repo"
    build_mlp_onnx(repo / "good", name="good", probe=FAST_PROBES)
    bad = build_mlp_onnx(
        repo / "bad",
        name="bad",
        probe={**FAST_PROBES, "inputs_file": "probe_in.npz", "expected_file": "probe_out.npz"},
    )
    np.savez(bad / "probe_in.npz", INPUT0=np.ones((1, 64), np.float32))
    np.savez(bad / "probe_out.npz", OUTPUT0=np.zeros((1, 10), np.float32))  # deliberately wrong
    server = ServerProcess(tmp_path / "server.log", repo)
    try:
        server.wait_live()
        wait_until(lambda: server.health("good") == "SERVING", 120, "the good model serving")
        server.wait_for_log("failed its probe")
        assert server.health("bad") == "NOT_SERVING"
        assert server.health("") == "NOT_SERVING" and server.health("readiness") == "NOT_SERVING"
        assert server.health("liveness") == "SERVING"
        assert server.health("nope") == "NOT_FOUND"
        assert server.client.is_model_ready("good") and not server.client.is_model_ready("bad")
        assert not server.client.is_server_ready() and server.client.is_server_live()
        assert server.http_get("/v2/models/good/ready") == 200
        assert server.http_get("/v2/models/good/versions/1/ready") == 200
        assert server.http_get("/v2/models/bad/ready") == 503
        assert server.http_get("/v2/health/ready") == 503
        assert server.http_get("/v2/health/live") == 200
        assert server.http_get("/v2/models/nope/ready") == 404
        assert "differs from the expected probe output" in server.log()
    finally:
        assert server.stop() == 0


def _watch(url: str, service: str, seen: queue.Queue, stop: threading.Event) -> None:
    with grpc.insecure_channel(url) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=120
        )
        try:
            for reply in stream:
                seen.put(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                if stop.is_set():
                    break
        except grpc.RpcError as exc:
            seen.put(f"error {exc.code().name}")


@pytest.mark.parametrize("frontends", [1, 2], ids=["direct", "relayed"])
def test_watch_streams_not_serving_then_serving_when_the_only_worker_dies(tmp_path, frontends):
    server = _serve(tmp_path, frontends, probe=FAST_PROBES)
    seen: queue.Queue = queue.Queue()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(server.url, "mlp", seen, stop), daemon=True)
    second: queue.Queue = queue.Queue()
    other = threading.Thread(target=_watch, args=(server.url, "", second, stop), daemon=True)
    try:
        watcher.start()
        other.start()
        assert seen.get(timeout=30) == "SERVING"
        assert second.get(timeout=30) == "SERVING"
        os.kill(server.worker_pids()[0], signal.SIGKILL)
        assert seen.get(timeout=60) == "NOT_SERVING"
        assert seen.get(timeout=60) == "SERVING"
        assert [second.get(timeout=60), second.get(timeout=60)] == ["NOT_SERVING", "SERVING"]
        assert server.http_get("/v2/models/mlp/ready") == 200
        x = np.ones((1, 64), np.float32)
        got = server.client.infer("mlp", _mlp_input(x)).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
    finally:
        stop.set()
        assert server.stop() == 0


def test_start_up_is_not_serving_until_warm_and_the_first_request_is_served_warm(tmp_path):
    build_mlp_torch(tmp_path / "repo" / "mlp", name="mlp")
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    seen: queue.Queue = queue.Queue()
    stop = threading.Event()
    try:
        server.wait_live()
        assert server.health("") == "NOT_SERVING"
        assert server.http_get("/v2/health/ready") == 503
        assert server.http_get("/v2/health/live") == 200
        threading.Thread(target=_watch, args=(server.url, "", seen, stop), daemon=True).start()
        first = seen.get(timeout=30)
        if first == "NOT_SERVING":
            assert seen.get(timeout=120) == "SERVING"
        else:
            pytest.fail(f"expected NOT_SERVING before warm-up ended, got {first}")
        assert server.http_get("/v2/health/ready") == 200
        x = np.ones((1, 64), np.float32)
        got = server.client.infer("mlp", _mlp_input(x)).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
        log = server.log()
        warm, probed, ready = (
            log.index("warm: torch"),
            log.index("passed its probe"),
            log.index("model mlp version 1 ready"),
        )
        assert warm < probed < ready
    finally:
        stop.set()
        assert server.stop() == 0


def test_the_pool_scales_up_under_latency_pressure_and_back_down_when_quiet(tmp_path):
    pool = {
        "workers": 1,
        "min_warm": 1,
        "max_workers": 2,
        "threads": 1,
        "p95_target_ms": 0.001,  # every request is over target while there is load
        "scale_up_after_s": 0.5,
        "scale_down_after_s": 1.0,
    }
    server = _serve(tmp_path, pool=pool, probe=FAST_PROBES)
    try:
        with Load(server.url, "mlp", threads=4) as load:
            wait_until(lambda: len(server.worker_pids()) == 2, 60, "a second worker")
            load.wait_for(100)
        assert load.errors == []
        status, report = server.http_json("/warmserve/models/mlp/latency")
        assert status == 200 and report["end_to_end"]["count"] > 0
        assert report["end_to_end"]["p50_ms"] <= report["end_to_end"]["p99_ms"]
        assert set(report["workers"]) <= {"mlp#1", "mlp#2", "mlp#3"}
        wait_until(lambda: len(server.worker_pids()) == 1, 60, "back to min_warm when quiet")
        assert server.health("mlp") == "SERVING"
        assert "1 → 2 workers" in server.log() and "2 → 1 workers" in server.log()
    finally:
        assert server.stop() == 0


class RejectedLoad(CallerThreads):
    """Threads sending requests the model itself raises on (a negative ITERS): every one must
    fail as a model error (or find the queue full), never reach a replaced or missing worker."""

    def call(self, client: triton.InferenceServerClient, seed: int, n: int) -> None:
        try:
            client.infer("spin", spin_inputs(-1), client_timeout=30)
        except triton.InferenceServerException as exc:
            if exc.status() in ("StatusCode.INTERNAL", "StatusCode.RESOURCE_EXHAUSTED"):
                return
            raise
        raise AssertionError("a request with a negative ITERS succeeded")


def test_a_flood_of_requests_the_model_rejects_never_gets_its_healthy_worker_replaced(tmp_path):
    # Every live batch fails in the model while the one worker is kept busy: the controller
    # probes it at once (on the next slot, ahead of the flood) and the probe clears it.
    build_spin_torch(tmp_path / "repo" / "spin", probe=FAST_PROBES)
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_ready()
        (worker,) = server.worker_pids()
        with RejectedLoad(server.url, threads=3) as flood:
            flood.wait_for(100)
            server.wait_for_log_count("batches failed in the model", 3)
            flood.wait_for(100)
        assert flood.errors == []
        assert server.worker_pids() == [worker]
        log = server.log()
        assert "failed its probe" not in log and "replacing worker" not in log
        assert server.health("spin") == "SERVING"
        server.client.infer("spin", spin_inputs(1))  # and it still computes
    finally:
        assert server.stop() == 0
