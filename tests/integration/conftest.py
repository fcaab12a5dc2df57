from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.testing.models import (
    IDENTITY_TYPES,
    build_demo_repository,
    build_identity_onnx,
    build_mlp_export,
    build_mlp_torch,
    build_spin_torch,
)
from tests.integration.harness import ServerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    build_demo_repository(root)
    build_identity_onnx(root / "identity")
    typed = tuple(t for t in IDENTITY_TYPES if t != "FP16")  # FP16 has no typed contents field
    build_identity_onnx(root / "identity_typed", name="identity_typed", types=typed)
    build_spin_torch(root / "spin")
    build_mlp_export(root / "mlp_export")
    # a worker that busy-polls 300 µs for its next batch before it sleeps (pool.idle_spin_us)
    build_mlp_torch(
        root / "mlp_spin", "mlp_spin", pool={"workers": 1, "threads": 1, "idle_spin_us": 300}
    )
    build_identity_onnx(root / "untouched", name="untouched")  # no test sends it a request
    return root


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    process = ServerProcess(log, repository, args=("--log-level", "DEBUG"))
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture()
def client(server) -> triton.InferenceServerClient:
    return server.client


def merged_behind_a_busy_worker(
    server: ServerProcess, requests: list[tuple[int, float]]
) -> dict[float, tuple[Any, Any]]:
    """On a server whose spin model has one worker taking one batch at a time: send a long
    request (ITERS 20000, X 1.0) that keeps the worker busy, then ``requests`` ((ITERS, X)
    each) that queue behind it and leave together as one batch (checked). Each X's (result,
    error), the long request's too."""
    results: queue.Queue[tuple[float, Any, Any]] = queue.Queue()

    def send(iters: int, value: float) -> None:
        server.client.async_infer(
            "spin",
            spin_inputs(iters, value),
            lambda result, error, value=value: results.put((value, result, error)),
        )

    send(20000, 1.0)
    server.wait_for_log_count("model spin: dispatching 1 rows from 1 requests", 1)
    for iters, value in requests:
        send(iters, value)
    count = len(requests)
    server.wait_for_log(f"model spin: {count} requests wait for a worker")
    outcomes = {}
    for _ in range(count + 1):
        value, result, error = results.get(timeout=60)
        outcomes[value] = (result, error)
    assert f"dispatching {count} rows from {count} requests" in server.log()  # they did merge
    return outcomes


def spin_inputs(iters: int, value: float = 0.0) -> list[triton.InferInput]:
    x = triton.InferInput("X", [1, 512], "FP32")
    x.set_data_from_numpy(np.full((1, 512), value, dtype=np.float32))
    n = triton.InferInput("ITERS", [1, 1], "INT64")
    n.set_data_from_numpy(np.array([[iters]], dtype=np.int64))
    return [x, n]


@pytest.fixture(scope="session")
def spin_iters(server):
    """ITERS that keep the spin model busy for about the given number of seconds."""
    client = server.client
    client.infer("spin", spin_inputs(10))
    start = time.monotonic()
    client.infer("spin", spin_inputs(200))
    per_iter = max((time.monotonic() - start) / 200, 1e-5)
    return lambda seconds: max(1, int(seconds / per_iter))
