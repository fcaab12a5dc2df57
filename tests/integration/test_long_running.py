"""What a server that runs for days must not accumulate: state of workers long replaced, series
of models long unloaded."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import sys
import weakref

import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.bundles.cache import BundleCache
from serve.bundles.repository import load_source
from serve.protocol import Datatype, InferRequest, Tensor
from serve.runtime import Runtime
from serve.testing.models import build_mlp_onnx, build_spin_torch
from tests.integration.harness import ServerProcess, wait_until


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
    # (the start-up warm-up's own series, warmserve_warm_up_*, exist only for the models warmed
    # up at start: a model loaded later has none)
    loaded = [s for s in _series(server, "other") if not s.startswith("warmserve_warm_up_")]
    assert loaded
    for _ in range(2):
        server.client.unload_model("other")
        assert _series(server, "other") == []  # none left behind: no series per model ever seen
        server.client.load_model("other")
        _infer(server, "other")
        assert len(_series(server, "other")) == len(loaded)
    assert _series(server, "mlp")  # the model still loaded keeps its own
    # its objects, frozen with the server's at start-up, are unfrozen and collected
    # (serve/memory.py: a frozen reference cycle is never freed)
    server.wait_for_log(
        r"model other version \S* stopped: \d+ objects freed among the \d{4,} frozen"
    )


def _live_worker_pid(server: ServerProcess, model: str) -> int:
    pids = re.findall(rf"worker {model}#\d+ \S+ [a-z ]*\(pid (\d+)\)", server.log())
    return int(pids[-1])


def test_the_latency_report_lists_live_workers_not_every_worker_replaced(server):
    for _ in range(3):
        victim = _live_worker_pid(server, "mlp")
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda v=victim: (
                _live_worker_pid(server, "mlp") != v and server.client.is_model_ready("mlp")
            ),
            60,
            "a replacement worker",
        )
        _infer(server, "mlp")
    status, report = server.http_json("/warmserve/models/mlp/latency")
    assert status == 200
    # the one live worker's window, not one per worker the model ever had
    assert len(report["workers"]) == 1, report["workers"]


def test_the_runtime_keeps_nothing_of_the_workers_it_replaced(tmp_path, caplog):
    """In-process: once a killed worker is replaced, no part of the runtime (pool, controller,
    latency windows) still holds anything of it: memory does not grow with each replacement."""
    build_mlp_onnx(tmp_path / "mlp", name="mlp", latency_budget_ms=1000.0)
    source = load_source(tmp_path / "mlp", BundleCache(tmp_path / "cache"))
    x = np.ones((1, 64), np.float32)

    async def kill_the_worker(runtime: Runtime) -> str:
        service = runtime.service("mlp")
        (worker,) = service.pool.warm_workers()
        gone, pid = worker.worker_id, worker.pid
        assert pid is not None
        del worker
        await runtime.infer(InferRequest("mlp", [Tensor("INPUT0", Datatype.FP32, x)]))
        await service.controller.tick()  # (its latency decisions looked at this worker too)
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(60):  # (bounds a broken test only)
            while not (
                service.ready and [w.worker_id for w in service.pool.warm_workers()] != [gone]
            ):
                await asyncio.sleep(0.05)
        await runtime.infer(InferRequest("mlp", [Tensor("INPUT0", Datatype.FP32, x)]))
        await service.controller.tick()
        return gone

    async def main() -> tuple[list[int], list[int]]:
        runtime = Runtime([source])
        await runtime.start()
        try:
            gone = [await kill_the_worker(runtime) for _ in range(3)]
            gc.collect()
            unused = ["".join(reversed(worker_id)) for worker_id in gone]  # held by nothing else
            return [sys.getrefcount(s) for s in gone], [sys.getrefcount(s) for s in unused]
        finally:
            await runtime.stop()

    caplog.set_level(logging.CRITICAL, logger="serve")  # (captured log lines hold the ids)
    held, unused = asyncio.run(main())
    assert held == unused  # nothing holds a replaced worker's id any more


def test_a_cancelled_request_still_queued_frees_its_arrays_at_once(tmp_path):
    """In-process: a caller that gives up while its request waits behind a long batch leaves
    nothing of its inputs in the queue (it is never computed; its memory goes now, not when the
    worker frees)."""
    build_spin_torch(tmp_path / "spin")
    source = load_source(tmp_path / "spin", BundleCache(tmp_path / "cache"))

    def spin(iters: int) -> InferRequest:
        x = Tensor("X", Datatype.FP32, np.zeros((1, 512), np.float32))
        return InferRequest("spin", [x, Tensor("ITERS", Datatype.INT64, np.array([[iters]]))])

    async def main() -> tuple[bool, bool]:
        runtime = Runtime([source])
        await runtime.start()
        try:
            service = runtime.service("spin")
            slow = asyncio.ensure_future(runtime.infer(spin(10**9)))  # busy until it is stopped
            async with asyncio.timeout(30):  # (bounds a broken test only)
                while service.batcher.inflight_batches == 0:
                    await asyncio.sleep(0.01)
            request = spin(1)
            queued = weakref.ref(request.inputs[0].data)
            waiting = asyncio.ensure_future(runtime.infer(request))
            del request
            async with asyncio.timeout(30):
                while service.batcher.queue_depth == 0:
                    await asyncio.sleep(0.01)
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            del waiting  # (a cancelled task keeps its frames, the request with them)
            for _ in range(3):
                await asyncio.sleep(0)  # (the task's done callbacks, which hold it, run)
            gc.collect()
            freed = queued() is None
            still_busy = service.batcher.inflight_batches == 1 and not slow.done()
            slow.cancel()
            return freed, still_busy
        finally:
            for worker in runtime.service("spin").pool.workers:  # (it would spin on for ages)
                os.kill(worker.pid or 0, signal.SIGKILL)
            await runtime.stop()

    freed, still_busy = asyncio.run(main())
    assert still_busy  # (the queue had not moved: the worker was busy all along)
    assert freed
