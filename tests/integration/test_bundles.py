"""Bundles served end to end: verification, pinning, rollout and rollback under load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.bundles.build import build_bundle
from serve.testing.models import build_mlp_onnx, mlp_reference
from tests.integration.harness import CallerThreads, ServerProcess, wait_until

OFFSET_POST = "def postprocess(outputs):\n    return {{'OUTPUT0': outputs['OUTPUT0'] + {offset}}}\n"
FAST_PROBES = {"interval_s": 0.3, "timeout_s": 2.0, "failures_to_replace": 1}


def mlp_bundle(
    tmp: Path,
    repo: Path,
    version: str,
    offset: float = 0.0,
    code: str = "",
    arrays: dict[str, dict[str, np.ndarray]] | None = None,
    **config,
):
    """The demo MLP as bundle ``mlp`` ``version``, its outputs shifted by ``offset``; ``arrays``
    are .npz files (name → arrays) to put in the bundle."""
    config.setdefault("probe", FAST_PROBES)
    folder = build_mlp_onnx(
        tmp / f"src-{version}", name="mlp", version=version, process="process.py", **config
    )
    (folder / "process.py").write_text(code or OFFSET_POST.format(offset=offset))
    for name, content in (arrays or {}).items():
        np.savez(folder / name, **content)
    return build_bundle(folder, repo / "mlp" / version)


def _input(rows: int = 1, seed: int = 0) -> tuple[np.ndarray, list[triton.InferInput]]:
    x = np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)
    tensor = triton.InferInput("INPUT0", [rows, 64], "FP32")
    tensor.set_data_from_numpy(x)
    return x, [tensor]


def test_bundles_answer_with_their_version_and_id_and_a_version_can_be_pinned(tmp_path):
    repo = tmp_path / "repo"
    first = mlp_bundle(tmp_path, repo, "1", 0.0)
    second = mlp_bundle(tmp_path, repo, "2", 1000.0)
    server = ServerProcess(tmp_path / "server.log", repo)
    try:
        server.wait_ready()
        x, inputs = _input(2)
        result = server.client.infer("mlp", inputs)
        response = result.get_response()
        assert response.model_version == "2"
        assert response.parameters["bundle_id"].string_param == second.id
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), mlp_reference(x) + 1000, rtol=1e-4)
        pinned = server.client.infer("mlp", inputs, model_version="1")
        assert pinned.get_response().parameters["bundle_id"].string_param == first.id
        np.testing.assert_allclose(
            pinned.as_numpy("OUTPUT0"), mlp_reference(x), rtol=1e-4, atol=1e-5
        )
        with pytest.raises(triton.InferenceServerException, match="no version '3'"):
            server.client.infer("mlp", inputs, model_version="3")
        assert sorted(server.client.get_model_metadata("mlp").versions) == ["1", "2"]
        index = {
            (m.version, m.state, m.reason)
            for m in server.client.get_model_repository_index().models
        }
        assert index == {("1", "READY", "loaded, not the active version"), ("2", "READY", "")}
    finally:
        assert server.stop() == 0


def test_a_tampered_bundle_is_refused_while_the_others_serve(tmp_path):
    repo = tmp_path / "repo"
    mlp_bundle(tmp_path, repo, "1")
    bad = build_bundle(build_mlp_onnx(tmp_path / "src-other", name="other"), repo / "other" / "1")
    (bad.path / "extra.txt").write_text("not part of the bundle\n")
    server = ServerProcess(tmp_path / "server.log", repo)
    try:
        server.wait_ready()
        assert [m.name for m in server.client.get_model_repository_index().models] == ["mlp"]
        assert "file extra.txt is not in the manifest" in server.log()
    finally:
        assert server.stop() == 0


def test_a_worker_verifies_the_bundle_before_importing_its_code(tmp_path):
    repo = tmp_path / "repo"
    marker = tmp_path / "imported"
    bundle = mlp_bundle(tmp_path, repo, "1")
    server = ServerProcess(tmp_path / "server.log", repo)
    try:
        server.wait_ready()
        # Swap the bundle's code for code that leaves a mark when imported, then make the
        # pool start a new worker: it must refuse the bundle before importing anything.
        (bundle.path / "process.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        (victim,) = server.worker_pids()
        os.kill(victim, signal.SIGKILL)
        server.wait_for_log("file process.py does not match its sha256")
        wait_until(lambda: server.health("mlp") == "NOT_SERVING", 30, "the model to stop serving")
        assert not marker.exists()
    finally:
        assert server.stop() == 0


class Traffic(CallerThreads):
    """Closed-loop callers recording (start, end, version, value offset) per call."""

    def __init__(self, url: str, threads: int = 4, rows: int = 1) -> None:
        super().__init__(url, threads, max_calls=100000)
        self.calls: list[tuple[float, float, str, float]] = []
        self._rows = rows

    def call(self, client: triton.InferenceServerClient, seed: int, n: int) -> None:
        x, inputs = _input(self._rows, seed * 100000 + n)
        start = time.monotonic()
        result = client.infer("mlp", inputs, client_timeout=30)
        offset = float(np.median(result.as_numpy("OUTPUT0") - mlp_reference(x)))
        self.calls.append((start, time.monotonic(), result.get_response().model_version, offset))

    def versions_started_after(self, moment: float) -> set[str]:
        return {version for start, _, version, _ in self.calls if start > moment}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _control_server(tmp_path: Path, repo: Path, *args: str) -> ServerProcess:
    env = {"WARMSERVE_KEEP_PREVIOUS_S": "300", "WARMSERVE_ROLLOUT_WATCH_S": "2"}
    server = ServerProcess(tmp_path / "server.log", repo, args=("--model-control", *args), env=env)
    try:
        server.wait_ready()
    except BaseException:  # (the caller's try/finally has not begun: stop it here)
        server.stop()
        raise
    return server


def test_rollout_and_rollback_under_load_lose_no_call(tmp_path):
    repo = tmp_path / "repo"
    mlp_bundle(tmp_path, repo, "1", 0.0)
    server = _control_server(tmp_path, repo)
    try:
        with Traffic(server.url) as traffic:
            traffic.wait_for(200)
            mlp_bundle(tmp_path, repo, "2", 1000.0)
            rolled = _cli("load", "mlp", "--url", server.url)
            assert rolled.returncode == 0, rolled.stderr
            switched = time.monotonic()
            traffic.wait_for(300)
            back = _cli("rollback", "mlp", "--url", server.url)
            assert back.returncode == 0, back.stderr
            returned = time.monotonic()
            traffic.wait_for(300)
        assert traffic.errors == []
        assert {v for _, _, v, _ in traffic.calls} == {"1", "2"}
        assert all(abs(o - (1000.0 if v == "2" else 0.0)) < 1e-2 for _, _, v, o in traffic.calls)
        assert traffic.versions_started_after(switched) - {"2"} <= {"1"}
        assert "1" not in {v for s, _, v, _ in traffic.calls if switched < s < returned - 5}
        assert traffic.versions_started_after(returned) == {"1"}
        log = server.log()
        assert "version 1 → 2 (rollout" in log and "version 2 → 1 (rollback)" in log
    finally:
        assert server.stop() == 0


def test_a_broken_new_version_never_takes_traffic(tmp_path):
    repo = tmp_path / "repo"
    mlp_bundle(tmp_path, repo, "1", 0.0)
    server = _control_server(tmp_path, repo)
    try:
        with Traffic(server.url) as traffic:
            traffic.wait_for(100)
            mlp_bundle(tmp_path, repo, "2", code="raise ImportError('broken on purpose')\n")
            broken = _cli("load", "mlp", "--url", server.url)
            assert broken.returncode != 0 and "still serving version 1" in broken.stderr
            wrong = {"in.npz": {"INPUT0": np.ones((1, 64), np.float32)}}
            wrong["out.npz"] = {"OUTPUT0": np.zeros((1, 10), np.float32)}  # not what it returns
            probe = {**FAST_PROBES, "inputs_file": "in.npz", "expected_file": "out.npz"}
            mlp_bundle(tmp_path, repo, "3", arrays=wrong, probe=probe)
            failing = _cli("load", "mlp", "--version", "3", "--url", server.url)
            assert failing.returncode != 0 and "still serving version 1" in failing.stderr
            assert "differs from the expected probe output" in failing.stderr
            traffic.wait_for(100)
        assert traffic.errors == []
        assert {v for _, _, v, _ in traffic.calls} == {"1"}
        log = server.log()
        assert "rollout of mlp version 2 refused" in log
        # Each load started a worker template under traffic: with gRPC's fork handlers on (they
        # once stalled a call here until its deadline) gRPC logs from fork_posix.cc on each.
        assert "fork_posix" not in log
        # version 3 loaded, its only worker failed its probe: said so, not "ready"
        assert "model mlp version 3 loaded but not ready: 0 of 1" in log
        assert "version 3 ready" not in log
        assert "CancelledError" not in log  # (a refused version's stop is not a lost worker)
    finally:
        assert server.stop() == 0


SLOW_WHEN_BATCHED = (
    "import time\n"
    "def postprocess(outputs):\n"
    "    if outputs['OUTPUT0'].shape[0] > 1:\n"
    "        time.sleep(0.2)\n"
    "    return outputs\n"
)


def test_a_version_over_its_budget_in_the_watch_window_is_rolled_back(tmp_path):
    repo = tmp_path / "repo"
    mlp_bundle(tmp_path, repo, "1", 0.0)
    server = _control_server(tmp_path, repo)
    try:
        with Traffic(server.url, rows=2) as traffic:
            traffic.wait_for(100)
            mlp_bundle(
                tmp_path,
                repo,
                "2",
                code=SLOW_WHEN_BATCHED,
                latency_budget_ms=50.0,
                max_batch_size=4,
            )
            rolled = _cli("load", "mlp", "--url", server.url)
            assert rolled.returncode == 0, rolled.stderr
            server.wait_for_log("version 2 rolled back to 1: P95", timeout=60)
            back = time.monotonic()
            traffic.wait_for(50)
        assert traffic.errors == []
        assert traffic.versions_started_after(back) == {"1"}
    finally:
        assert server.stop() == 0


def test_model_control_is_off_unless_enabled(tmp_path):
    repo = tmp_path / "repo"
    mlp_bundle(tmp_path, repo, "1")
    server = ServerProcess(tmp_path / "server.log", repo)
    try:
        server.wait_ready()
        with pytest.raises(triton.InferenceServerException, match="model control is disabled"):
            server.client.load_model("mlp")
        refused = _cli("unload", "mlp", "--url", server.url)
        assert refused.returncode != 0 and "FAILED_PRECONDITION" in refused.stderr
    finally:
        assert server.stop() == 0


def test_a_tampered_new_version_is_refused_naming_the_file_and_unload_stops_a_model(tmp_path):
    repo = tmp_path / "repo"
    mlp_bundle(tmp_path, repo, "1", 0.0)
    server = _control_server(tmp_path, repo)
    try:
        second = mlp_bundle(tmp_path, repo, "2", 1000.0)
        (second.path / "process.py").write_text(OFFSET_POST.format(offset=5.0))
        tampered = _cli("load", "mlp", "--version", "2", "--url", server.url)
        assert tampered.returncode != 0
        assert "FAILED_PRECONDITION" in tampered.stderr
        assert "file process.py does not match its sha256" in tampered.stderr
        unknown = _cli("load", "ml", "--url", server.url)  # not mlp's broken bundle's fault
        assert unknown.returncode != 0 and "NOT_FOUND" in unknown.stderr
        assert "1 other bundle(s) refused: " in unknown.stderr
        assert "process.py does not match its sha256" in unknown.stderr.split("refused: ")[1]
        _, inputs = _input()
        assert server.client.infer("mlp", inputs).get_response().model_version == "1"
        listed = _cli("index", "--url", server.url)
        assert listed.returncode == 0 and listed.stdout.split("\t")[:3] == ["mlp", "1", "READY"]
        unloaded = _cli("unload", "mlp", "--url", server.url)
        assert unloaded.returncode == 0, unloaded.stderr
        with pytest.raises(triton.InferenceServerException, match="NOT_FOUND"):
            server.client.infer("mlp", inputs)
        assert not server.client.is_model_ready("mlp")  # unloaded: not ready (Triton's answer)
        assert server.client.get_model_repository_index().models == []
    finally:
        assert server.stop() == 0


def test_the_bundle_commands_build_verify_and_inspect(tmp_path):
    source = build_mlp_onnx(tmp_path / "src", name="cli_model", version="7")
    out = tmp_path / "bundle"
    built = _cli(
        "bundle", "build", str(source), "--out", str(out), "--archive", str(tmp_path / "m.wsb")
    )
    assert built.returncode == 0, built.stderr
    bundle_id = built.stdout.strip().rsplit(" ", 1)[-1]
    verified = _cli("bundle", "verify", str(tmp_path / "m.wsb"))
    assert verified.returncode == 0 and bundle_id in verified.stdout
    inspected = _cli("bundle", "inspect", str(out))
    assert '"version": "7"' in inspected.stdout and bundle_id in inspected.stdout
    (out / "model.onnx").write_bytes(b"changed")
    refused = _cli("bundle", "verify", str(out))
    assert refused.returncode == 2 and "file model.onnx does not match its sha256" in refused.stderr


def test_a_bundle_of_safetensors_weights_with_its_architecture_in_code_serves(tmp_path):
    from serve.testing.models import build_mlp_safetensors

    bundle = build_bundle(build_mlp_safetensors(tmp_path / "src"), tmp_path / "repo" / "st" / "1")
    assert {f.path for f in bundle.manifest.files} == {"model.safetensors", "process.py"}
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_ready()
        x, inputs = _input(3)
        got = server.client.infer("mlp_safetensors", inputs).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
    finally:
        assert server.stop() == 0


SLOW_IMPORT = "import time\ntime.sleep(1.0)\n" + OFFSET_POST.format(offset=0.0)


def model_bundle(tmp: Path, repo: Path, name: str, version: str, code: str) -> None:
    """The demo MLP as bundle ``name`` ``version`` with ``code`` as its process module."""
    folder = build_mlp_onnx(
        tmp / f"src-{name}-{version}", name=name, version=version, process="process.py",
        probe=FAST_PROBES,
    )  # fmt: skip
    (folder / "process.py").write_text(code)
    build_bundle(folder, repo / name / version)


def test_a_new_model_keeps_the_server_ready_while_it_warms_and_a_failed_one_leaves_no_trace(
    tmp_path,
):
    repo = tmp_path / "repo"
    mlp_bundle(tmp_path, repo, "1", 0.0)
    server = _control_server(tmp_path, repo)
    try:
        model_bundle(tmp_path, repo, "other", "1", SLOW_IMPORT)  # warms for over a second
        command = [sys.executable, "-m", "serve", "load", "other", "--url", server.url]
        loading = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen, give_up = [], time.monotonic() + 120
        while loading.poll() is None and time.monotonic() < give_up:
            seen.append(server.health(""))
        assert loading.wait(timeout=60) == 0, loading.stderr.read() if loading.stderr else ""
        assert len(seen) > 1 and set(seen) == {"SERVING"}
        assert server.health("other") == "SERVING"
        model_bundle(tmp_path, repo, "broken", "1", "raise ImportError('broken on purpose')\n")
        broken = _cli("load", "broken", "--url", server.url)
        assert broken.returncode != 0 and "did not become ready" in broken.stderr
        assert server.health("") == "SERVING"
        listed = _cli("index", "--url", server.url)
        assert listed.returncode == 0 and "broken" not in listed.stdout, listed.stdout
        _, inputs = _input()
        with pytest.raises(triton.InferenceServerException, match="unknown model 'broken'"):
            server.client.infer("broken", inputs)
    finally:
        assert server.stop() == 0


def test_a_model_that_cannot_warm_up_is_refused_for_good_naming_the_cause(tmp_path):
    """A load whose model fails its warm-up is not a passing condition: UNAVAILABLE would have
    clients retry it for ever. FAILED_PRECONDITION, with the model's own error."""
    repo = tmp_path / "repo"
    mlp_bundle(tmp_path, repo, "1", 0.0)
    bad_output = "def postprocess(outputs):\n    return {'OUTPUT0': outputs['OUTPUT0'][:, :3]}\n"
    server = _control_server(tmp_path, repo)
    try:
        model_bundle(tmp_path, repo, "badshape", "1", bad_output)
        with pytest.raises(triton.InferenceServerException) as refused:
            server.client.load_model("badshape")
        assert str(refused.value.status()) == "StatusCode.FAILED_PRECONDITION"
        message = refused.value.message()
        assert "did not become ready" in message and "has shape [1, 3]" in message, message
        assert server.health("") == "SERVING"
    finally:
        assert server.stop() == 0


def test_a_load_whose_caller_gives_up_completes_and_two_loads_of_a_version_make_one_pool(
    tmp_path,
):
    repo = tmp_path / "repo"
    mlp_bundle(tmp_path, repo, "1", 0.0)
    server = _control_server(tmp_path, repo)
    try:
        model_bundle(tmp_path, repo, "other", "1", SLOW_IMPORT)
        with pytest.raises(triton.InferenceServerException, match="Deadline"):
            server.client.load_model("other", client_timeout=0.3)
        wait_until(lambda: server.health("other") == "SERVING", 60, "the load to complete")
        _, inputs = _input()
        assert server.client.infer("other", inputs).get_response().model_version == "1"
        mlp_bundle(tmp_path, repo, "2", 0.0, code=SLOW_IMPORT)
        command = [sys.executable, "-m", "serve", "load", "mlp", "--version", "2"]
        loads = [
            subprocess.Popen([*command, "--url", server.url], stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        assert [load.wait(timeout=120) for load in loads] == [0, 0]
        # mlp 1 (kept warm for a rollback), mlp 2 and other: one worker each, none left over
        assert len(server.worker_pids()) == 3
        assert "model mlp: version 1 → 2 (rollout" in server.log()
    finally:
        assert server.stop() == 0


def test_load_parameters_are_acted_on_or_refused_never_ignored(tmp_path):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    repo = tmp_path / "repo"
    mlp_bundle(tmp_path, repo, "1", 0.0)
    server = _control_server(tmp_path, repo)
    try:
        with pytest.raises(triton.InferenceServerException, match="load it by name") as caught:
            server.client.load_model("mlp", config='{"max_batch_size": 2}')
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        with grpc.insecure_channel(server.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.RepositoryModelLoadRequest(model_name="mlp")
            request.parameters["rollback"].string_param = "true"  # a string, as some tools send
            with pytest.raises(grpc.RpcError) as refused:
                stub.RepositoryModelLoad(request, timeout=60)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert "no previous version to roll back to" in str(refused.value.details())
            request = service_pb2.RepositoryModelLoadRequest(model_name="mlp")
            request.parameters["versoin"].string_param = "1"
            with pytest.raises(grpc.RpcError) as unknown:
                stub.RepositoryModelLoad(request, timeout=60)
            assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown parameters ['versoin']" in str(unknown.value.details())
            request = service_pb2.RepositoryModelLoadRequest(model_name="mlp")
            request.parameters["version"].bool_param = True  # not text "True"
            with pytest.raises(grpc.RpcError) as wrong_type:
                stub.RepositoryModelLoad(request, timeout=60)
            assert wrong_type.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "parameter 'version' must be" in str(wrong_type.value.details())
            request = service_pb2.RepositoryModelLoadRequest(model_name="mlp")
            request.parameters["version"].int64_param = 1  # the version of that number
            stub.RepositoryModelLoad(request, timeout=60)
            unload = service_pb2.RepositoryModelUnloadRequest(model_name="mlp")
            unload.parameters["version"].int64_param = 7  # no such version loaded
            with pytest.raises(grpc.RpcError) as missing:
                stub.RepositoryModelUnload(unload, timeout=60)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert "7" in str(missing.value.details())
        server.client.unload_model("mlp")  # (tritonclient sends unload_dependents)
        assert server.client.get_model_repository_index().models == []
    finally:
        assert server.stop() == 0


def test_queued_calls_fail_unavailable_while_replacement_workers_fail_to_start(tmp_path):
    repo = tmp_path / "repo"
    busy, slow = tmp_path / "busy", tmp_path / "slow"
    code = (  # slow calls once the test says so (not the warm-up's)
        "import pathlib, time\n"
        "def postprocess(outputs):\n"
        f"    if pathlib.Path({str(slow)!r}).exists():\n"
        f"        pathlib.Path({str(busy)!r}).touch()\n"
        "        time.sleep(2.0)\n"
        "    return outputs\n"
    )
    pool = {"workers": 1, "threads": 1, "max_inflight_per_worker": 1}
    bundle = mlp_bundle(tmp_path, repo, "1", code=code, pool=pool, probe={"interval_s": 60})
    server = ServerProcess(tmp_path / "server.log", repo)
    try:
        server.wait_ready()
        slow.touch()
        outcomes: list[Any] = []
        client = triton.InferenceServerClient(server.url)
        _, inputs = _input()
        for _ in range(2):  # the first computes, the second queues behind it
            client.async_infer(
                "mlp", inputs, lambda result, error: outcomes.append(error), client_timeout=60
            )
            if not busy.exists():
                wait_until(busy.exists, 30, "the first call computing")
        queued = lambda: server.http_json("/warmserve/models/mlp/latency")[1]["queue_depth"]  # noqa: E731
        wait_until(lambda: queued() == 1, 30, "the second call queued")
        (bundle.path / "process.py").write_text("# changed on disk: new workers refuse it\n")
        (victim,) = server.worker_pids()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(outcomes) == 2, 60, "both calls answered")
        client.close()
        for error in outcomes:  # (the one computing was retried once, then failed the same way)
            assert error is not None and error.status() == "StatusCode.UNAVAILABLE"
            assert "worker start(s) failed" in error.message()
            assert "does not match its sha256" in error.message()
    finally:
        assert server.stop() == 0


def test_a_load_frees_the_unpacked_copy_of_a_version_gone_from_the_repository(tmp_path):
    """A long-lived pod rolls out .wsb after .wsb into a 2 GiB emptyDir: the unpacked copy of a
    version neither in the repository nor loaded any more is removed; the active one's stays,
    and so does an unpacking leftover of a killed process until it is an hour old."""
    from serve.bundles.archive import write_archive

    repo, cache = tmp_path / "repo", tmp_path / "cache"
    repo.mkdir()
    first = mlp_bundle(tmp_path, tmp_path / "built", "1")
    old = write_archive(first.path, repo / "mlp-1.wsb")
    leftover, recent = cache / "bundles" / ".extract-old", cache / "bundles" / ".extract-new"
    for folder in (leftover, recent):
        (folder / "bundle").mkdir(parents=True)
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    env = {
        "WARMSERVE_CACHE_DIR": str(cache),
        "WARMSERVE_KEEP_PREVIOUS_S": "300",
        "WARMSERVE_ROLLOUT_WATCH_S": "0",
    }
    server = ServerProcess(tmp_path / "server.log", repo, args=("--model-control",), env=env)
    try:
        server.wait_ready()
        assert not leftover.exists() and recent.exists()
        second = mlp_bundle(tmp_path, tmp_path / "built", "2", 1000.0)
        write_archive(second.path, repo / "mlp-2.wsb")
        assert _cli("load", "mlp", "--url", server.url).returncode == 0
        old.unlink()
        kept = _cli("load", "mlp", "--url", server.url)  # version 1 is loaded (kept warm)
        assert kept.returncode == 0, kept.stderr
        assert (cache / "bundles" / first.id).is_dir()
        unloaded = _cli("unload", "mlp", "--version", "1", "--url", server.url)
        assert unloaded.returncode == 0, unloaded.stderr
        assert _cli("load", "mlp", "--url", server.url).returncode == 0
        entries = sorted(p.name for p in (cache / "bundles").iterdir())
        assert entries == [".extract-new", second.id, f"{second.id}.lock"]
        assert f"bundle cache: removed {cache / 'bundles' / first.id} (" in server.log()
        response = server.client.infer("mlp", _input()[1]).get_response()
        assert (response.model_version, response.parameters["bundle_id"].string_param) == (
            "2",
            second.id,
        )
    finally:
        assert server.stop() == 0
