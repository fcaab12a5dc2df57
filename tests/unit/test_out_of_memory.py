"""A batch that runs out of memory (a GPU's, or the host's) fails alone, RESOURCE_EXHAUSTED
with advice its caller can act on; the worker gives back what its framework caches and serves
on (a merged batch's requests run again each on its own: test_batcher). At start-up, running
out of memory is the host's condition, not the model's fault. No process: the worker is driven
in this one."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from serve.backends.base import Arrays, is_out_of_memory
from serve.errors import InvalidInputError, ModelExecutionError, ModelOutOfMemoryError
from serve.frontend.status import status_for
from serve.pool.messages import BatchDone, BatchFailed, RunBatch, frame
from serve.protocol.datatypes import Datatype
from serve.telemetry.metrics import outcome
from serve.worker.main import ModelStartError, start_failed
from tests.unit.test_worker_buckets import worker  # noqa: F401 - the fixture
from tests.unit.test_worker_handle import _in_flight, _linked_handle

ORT_ARENA = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
    "MatMul node. Name:'MatMul_0' Status Message: bfc_arena.cc:376 void* onnxruntime::BFCArena::"
    "AllocateRawInternal(size_t, bool) Failed to allocate memory for requested buffer of size 1"
)


def _numpy_memory_error() -> MemoryError:
    try:
        np.empty(1 << 50, dtype=np.float64)  # 8 PiB: refused at once, nothing is touched
    except MemoryError as exc:
        return exc
    raise AssertionError("numpy allocated 8 PiB")


def _raised_from(cause: BaseException) -> RuntimeError:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise RuntimeError("the model's forward failed") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        _numpy_memory_error(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError(ORT_ARENA),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"),
        _raised_from(MemoryError()),
    ],
    ids=["MemoryError", "numpy", "torch", "cuda", "onnxruntime", "cublas", "chained"],
)
def test_the_ways_frameworks_say_memory_ran_out_are_recognised(exc):
    assert is_out_of_memory(exc)


@pytest.mark.parametrize(
    "exc",
    [
        None,
        RuntimeError("CUDA error: device-side assert triggered"),
        ValueError("output 'Y' has shape [1, 2]"),
        _raised_from(KeyError("X")),
    ],
)
def test_other_errors_are_not_taken_for_running_out_of_memory(exc):
    assert not is_out_of_memory(exc)


def test_a_batch_out_of_memory_fails_alone_and_the_worker_frees_its_cache_and_serves_on(worker):  # noqa: F811
    worker, backend, parent_in, parent_out = worker
    released: list[int] = []
    backend.release_memory = lambda: released.append(len(backend.ran_rows))  # type: ignore[method-assign]
    run = backend.run

    def run_that_fits_two_rows(inputs: Arrays) -> Arrays:
        if inputs["X"].shape[0] > 2:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                "of 79.19 GiB\nIf reserved but unallocated memory is large try setting ..."
            )
        return run(inputs)

    backend.run = run_that_fits_two_rows  # type: ignore[method-assign]
    x = np.ones((3, 4), np.float32)
    failed = worker.run_batch(RunBatch(9, 0, 3, parent_in.write(0, [("X", Datatype.FP32, [x])])))
    assert isinstance(failed, BatchFailed)
    assert (failed.batch_id, failed.kind) == (9, "out_of_memory")
    assert failed.message == (
        "out of memory computing a batch of 3 rows (run as the 4-row bucket): "
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
        "capacity of 79.19 GiB"  # the first line only, not the allocator's advice
    )
    assert released == [0]  # given back once, after the failed batch
    refs = parent_in.write(0, [("X", Datatype.FP32, [x[:2]])])
    done = worker.run_batch(RunBatch(10, 0, 2, refs))
    assert isinstance(done, BatchDone)  # the same worker serves the batch that fits
    (ref,) = done.outputs
    assert parent_out.read(0, ref, copy=True)[:, 0].tolist() == [8.0, 8.0]
    assert released == [0]


def test_the_serving_process_tells_out_of_memory_from_other_failures_and_advises():
    got: list[object] = []
    handle, link = _linked_handle(on_change=lambda w: None)
    for batch_id, kind in ((1, "out_of_memory"), (2, "execution"), (3, "invalid_input")):
        _in_flight(handle, batch_id, got.append)
        link.data_received(frame(BatchFailed(batch_id, kind, f"{kind} here")))  # type: ignore[attr-defined]
    oom, execution, invalid = got
    assert type(oom) is ModelOutOfMemoryError
    assert str(oom) == "model 'm': out_of_memory here; send fewer rows per request, or retry later"
    assert status_for(oom)[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert outcome(oom) == "out_of_memory"  # (warmserve_requests_total's label)
    assert type(execution) is ModelExecutionError
    assert status_for(execution)[0] is grpc.StatusCode.INTERNAL
    assert type(invalid) is InvalidInputError
    assert handle.failed_in_a_row == 2  # the controller probes a worker whose batches fail
    assert handle.free_slots == 2


def test_out_of_memory_at_start_up_is_the_hosts_condition_not_the_models_fault():
    def failure(cause: Exception) -> ModelStartError:
        try:
            raise ModelStartError(cause) from cause
        except ModelStartError as exc:
            return exc

    oom = start_failed(failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")))
    assert not oom.model_fault  # UNAVAILABLE to a load: it may pass once the memory is free
    assert oom.message.startswith("start-up failed: out of memory: the model failed to load")
    broken = start_failed(failure(ValueError("output 'Y' is FP64, the model config says FP32")))
    assert broken.model_fault  # FAILED_PRECONDITION: the same bundle fails the same way
    host = start_failed(OSError(24, "Too many open files"))
    assert not host.model_fault and "OSError" in host.message


def test_onnxruntime_shrinks_its_arenas_on_the_run_after_one_ran_out_of_memory(
    tmp_path, monkeypatch
):
    import onnxruntime as ort

    from serve.backends.base import load_backend, sample_inputs
    from serve.config import load_model_dir
    from serve.testing.models import build_mlp_onnx, mlp_reference

    model = load_model_dir(build_mlp_onnx(tmp_path / "mlp", name="mlp"))
    backend = load_backend(model, "cpu", 1)
    options: list[object] = []
    session = backend._session  # type: ignore[attr-defined]
    real_run = session.run

    class Recorded:  # (InferenceSession.run is read-only on the session itself)
        def run(self, names, feed, run_options=None):  # type: ignore[no-untyped-def]
            options.append(run_options)
            return real_run(names, feed, run_options)

    monkeypatch.setattr(backend, "_session", Recorded())
    inputs = sample_inputs(model, 2)
    backend.release_memory()
    for _ in range(2):  # onnxruntime accepts the setting for this host's arena, and computes
        (y,) = backend.run(inputs).values()
        np.testing.assert_allclose(y, mlp_reference(inputs["INPUT0"]), rtol=1e-4, atol=1e-5)
    shrink, plain = options
    assert isinstance(shrink, ort.RunOptions)
    assert shrink.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert plain is None  # once: shrinking on every run would cost every batch
