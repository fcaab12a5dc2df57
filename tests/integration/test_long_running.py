"""What a server that runs for days must not accumulate: state of workers long replaced, series
of models long unloaded."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_running")
    build_mlp_onnx(root / "repo" / "mlp", name="mlp")
    build_mlp_onnx(root / "repo" / "other", name="other")
    process = ServerProcess(root / "server.log", root / "repo", args=("--model-control",))
    try:
        process.wait_ready()
        yield process
    finally:
        assert process.stop() == 0


def _infer(server: ServerProcess, model: str) -> None:
    tensor = triton.InferInput("INPUT0", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    server.client.infer(model, [tensor])


def _series(server: ServerProcess, model: str) -> list[str]:
    status, text = server.http_text("/metrics")
    assert status == 200
    return [line for line in text.splitlines() if f'model="{model}"' in line]


def test_an_unloaded_model_leaves_no_metrics_series(server):
    _infer(server, "other")
    loaded = _series(server, "other")
    assert loaded
    for _ in range(2):
        server.client.unload_model("other")
        assert _series(server, "other") == []  # none left behind: no series per model ever seen
        server.client.load_model("other")
        _infer(server, "other")
        assert len(_series(server, "other")) == len(loaded)
    assert _series(server, "mlp")  # the model still loaded keeps its own
