"""A model that must run on a GPU never serves from the CPU: its workers fail to start and it is
UNAVAILABLE, naming the cause (here, on a CPU-only machine, for every CUDA model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton

from serve.testing.models import build_mlp_onnx, mlp_reference
from tests.integration.harness import ServerProcess

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="this onnxruntime has a CUDA provider: the CUDA models would load",
)


def _states(server: ServerProcess) -> dict[str, tuple[str, str]]:
    """Model name → (state, reason) once the server's start-up is over (every model loaded or
    failed, the active versions chosen)."""
    server.wait_live()
    server.wait_for_log(r"serve\.app: (ready|start-up over, NOT ready): ", timeout=120)
    index = server.client.get_model_repository_index().models
    return {model.name: (model.state, model.reason) for model in index}


def _serves(server: ServerProcess, model: str) -> bool:
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    tensor = triton.InferInput("INPUT0", [2, 64], "FP32")
    tensor.set_data_from_numpy(x)
    out = server.client.infer(model, [tensor]).as_numpy("OUTPUT0")
    return bool(np.allclose(out, mlp_reference(x), rtol=1e-4, atol=1e-5))


def test_with_require_gpu_an_auto_model_is_unavailable_and_a_cpu_model_serves(tmp_path: Path):
    repo = tmp_path / "repo"
    build_mlp_onnx(repo / "on_auto", name="on_auto", device="auto")
    build_mlp_onnx(repo / "on_cpu", name="on_cpu", device="cpu")
    server = ServerProcess(tmp_path / "server.log", repo, env={"WARMSERVE_REQUIRE_GPU": "1"})
    try:
        states = _states(server)
        state, reason = states["on_auto"]
        assert state == "UNAVAILABLE", states
        assert "model 'on_auto' must run on a GPU" in reason
        assert "WARMSERVE_REQUIRE_GPU is set" in reason
        assert "no CUDAExecutionProvider" in reason
        assert states["on_cpu"] == ("READY", ""), states
        assert _serves(server, "on_cpu")
        assert not server.client.is_server_ready()
    finally:
        server.stop()


def test_an_explicit_cuda_device_without_cuda_is_unavailable_while_auto_serves_on_cpu(
    tmp_path: Path,
):
    repo = tmp_path / "repo"
    build_mlp_onnx(repo / "on_auto", name="on_auto", device="auto")
    build_mlp_onnx(repo / "on_cuda", name="on_cuda", device="cuda:0")
    server = ServerProcess(tmp_path / "server.log", repo, env={"WARMSERVE_REQUIRE_GPU": "0"})
    try:
        states = _states(server)
        state, reason = states["on_cuda"]
        assert state == "UNAVAILABLE", states
        assert "device cuda:0 is not available" in reason
        assert "no CUDAExecutionProvider" in reason
        assert states["on_auto"] == ("READY", ""), states
        assert _serves(server, "on_auto")
    finally:
        server.stop()
