"""On a CUDA machine: workers pin to the GPU, capture CUDA graphs per bucket, and stay correct."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.testing.models import build_image_cnn, build_mlp_onnx, build_mlp_torch, mlp_reference
from tests.integration.harness import ServerProcess

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    build_mlp_torch(root / "repo" / "mlp_torch", device="cuda:0")
    build_image_cnn(root / "repo" / "image_cnn", device="cuda:0")
    build_mlp_onnx(root / "repo" / "mlp_onnx", device="cuda:0")
    server = ServerProcess(root / "server.log", root / "repo")
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


def test_torch_workers_capture_a_cuda_graph_per_bucket(gpu_server):
    log = gpu_server.log()
    assert "torch" in log and "on cuda:0, 7 CUDA graphs" in log  # mlp: buckets 1..64
    assert "on cuda:0, 6 CUDA graphs" in log  # image_cnn: buckets 1..32


@pytest.mark.parametrize("rows", [1, 3, 8, 64])
def test_graph_replay_matches_the_reference_for_padded_and_exact_buckets(gpu_server, rows):
    x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
    tensor = triton.InferInput("INPUT0", [rows, 64], "FP32")
    tensor.set_data_from_numpy(x)
    for model in ("mlp_torch", "mlp_onnx"):
        got = gpu_server.client.infer(model, [tensor]).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-3, atol=1e-3)
