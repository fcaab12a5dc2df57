"""On a CUDA machine: workers pin to the GPU, capture CUDA graphs per bucket, and stay correct."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.bundles.build import build_bundle
from serve.testing.models import build_image_cnn, build_mlp_onnx, build_mlp_torch, mlp_reference
from tests.integration.harness import ServerProcess

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    build_mlp_torch(root / "repo" / "mlp_torch", device="cuda:0")
    build_image_cnn(root / "repo" / "image_cnn", device="cuda:0")
    # "auto": the lent GPU machines carry the CPU build of onnxruntime (MEASURED.md), and an
    # explicit cuda:0 without the CUDA provider now fails the model's start (as it should)
    build_mlp_onnx(root / "repo" / "mlp_onnx", device="auto")
    # A bundle: its worker loads the TorchScript from the bytes it verified (a BytesIO onto
    # cuda:0), not from the file's path as for the plain folders above.
    source = build_mlp_torch(root / "src" / "mlp_bundled", name="mlp_bundled", device="cuda:0")
    build_bundle(source, root / "repo" / "mlp_bundled" / "1")
    # Through two relay processes (--frontends 2): the calls of these tests take the relayed
    # path to the CUDA workers; the sticky-error test below serves from one process.
    server = ServerProcess(root / "server.log", root / "repo", args=("--frontends", "2"))
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
    for model in ("mlp_torch", "mlp_onnx", "mlp_bundled"):
        got = gpu_server.client.infer(model, [tensor]).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-3, atol=1e-3)


def test_each_batch_of_a_bucket_gets_its_own_outputs_not_the_last_ones(gpu_server):
    """A bucket's page-locked buffers and graph tensors are reused batch after batch, and a
    smaller batch copies only its own rows: each reply must still come from its own request."""
    for seed, rows in enumerate([4, 3, 4, 3, 1, 2]):
        x = np.random.default_rng(100 + seed).standard_normal((rows, 64)).astype(np.float32)
        tensor = triton.InferInput("INPUT0", [rows, 64], "FP32")
        tensor.set_data_from_numpy(x)
        got = gpu_server.client.infer("mlp_torch", [tensor]).as_numpy("OUTPUT0")
        assert got.shape[0] == rows
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-3, atol=1e-3)


def test_cuda_workers_page_lock_their_input_arena(gpu_server):
    # the rows of a batch then go to the GPU by DMA straight from shared memory
    assert "page-locked for device copies" in gpu_server.log()


def test_cuda_workers_spin_for_their_next_batch_by_default(gpu_server):
    # pool.idle_spin_us = -1 (auto): a CUDA worker busy-polls CUDA_IDLE_SPIN_US after a batch
    from serve.config import CUDA_IDLE_SPIN_US

    assert f"idle spin {CUDA_IDLE_SPIN_US:g} µs" in gpu_server.log()


def test_a_sticky_cuda_error_ends_the_worker_and_the_pool_replaces_it(tmp_path):
    """An out-of-range index on the GPU trips a device-side assert, which poisons the CUDA
    context: the worker must exit (not keep failing every batch) and be replaced."""
    import torch

    class Gather(torch.nn.Module):
        def forward(self, index: torch.Tensor) -> torch.Tensor:
            table = torch.arange(8, device=index.device, dtype=torch.float32)
            return table[index].unsqueeze(1)

    folder = tmp_path / "repo" / "gather"
    folder.mkdir(parents=True)
    torch.jit.script(Gather()).save(str(folder / "model.pt"))
    from serve.testing.models import write_config

    write_config(
        folder,
        {
            "name": "gather",
            "backend": "torch",
            "model_file": "model.pt",
            "max_batch_size": 4,
            "device": "cuda:0",
            "inputs": [{"name": "INDEX", "datatype": "INT64", "shape": [1]}],
            "outputs": [{"name": "VALUE", "datatype": "FP32", "shape": [1, 1]}],
        },
    )
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_ready(timeout=300)
        (first,) = server.worker_pids()
        bad = triton.InferInput("INDEX", [1, 1], "INT64")
        bad.set_data_from_numpy(np.array([[1000]], dtype=np.int64))
        with pytest.raises(triton.InferenceServerException):
            server.client.infer("gather", [bad])
        server.wait_for_log("fatal error; exiting so the pool replaces this worker", timeout=60)
        server.wait_ready(timeout=300)
        assert first not in server.worker_pids()
        good = triton.InferInput("INDEX", [1, 1], "INT64")
        good.set_data_from_numpy(np.array([[3]], dtype=np.int64))
        assert server.client.infer("gather", [good]).as_numpy("VALUE").tolist() == [[[3.0]]]
    finally:
        server.stop()


# Asks the GPU for 1 PiB on any batch that holds the value 9.0: a real CUDA out-of-memory error
# from torch's caching allocator, in the worker, beside a model on the same device.
OUT_OF_GPU_MEMORY = """\
import torch


def preprocess(inputs):
    if (inputs["INPUT0"] == 9.0).any():
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
    return inputs
"""


def test_a_batch_out_of_gpu_memory_fails_resource_exhausted_and_the_worker_serves_on(tmp_path):
    folder = build_mlp_torch(tmp_path / "repo" / "mlp_torch", device="cuda:0", process="process.py")
    (folder / "process.py").write_text(OUT_OF_GPU_MEMORY)
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_ready(timeout=300)
        workers = server.worker_pids()
        x = triton.InferInput("INPUT0", [1, 64], "FP32")
        x.set_data_from_numpy(np.full((1, 64), 9.0, dtype=np.float32))
        with pytest.raises(triton.InferenceServerException) as caught:
            server.client.infer("mlp_torch", [x])
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED", caught.value.message()
        assert "out of memory computing a batch of 1 rows" in caught.value.message()
        assert "CUDA out of memory" in caught.value.message()
        good = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
        x = triton.InferInput("INPUT0", [3, 64], "FP32")
        x.set_data_from_numpy(good)
        out = server.client.infer("mlp_torch", [x]).as_numpy("OUTPUT0")
        np.testing.assert_allclose(out, mlp_reference(good), rtol=1e-3, atol=1e-3)
        assert server.worker_pids() == workers  # not ended, not replaced
    finally:
        server.stop()
