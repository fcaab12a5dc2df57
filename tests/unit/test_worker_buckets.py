"""A fixed-shape backend's batch runs on the smallest warmed bucket that holds it: the worker
pre-processes the batch's own rows, the backend pads (or copies only those rows), and only the
batch's rows come back. No process: the worker is driven in this one."""

from __future__ import annotations

import os

import numpy as np
import pytest

import serve.backends
from serve.backends.base import Arrays, Backend, pad_rows
from serve.errors import InvalidInputError
from serve.pool.arena import Arena, create_memfd
from serve.pool.messages import IPC_VERSION, BatchDone, BatchFailed, Init, RunBatch
from serve.protocol.datatypes import Datatype
from serve.worker.main import Worker
from tests.unit.test_controller import _model


class Doubling(Backend):
    """Y = sum(X) * 2 per row; records the row counts it was asked to run."""

    name = "doubling"
    fixed_shapes = True

    def __init__(self) -> None:
        super().__init__(_model(), "cpu", 1)
        self.ran_rows: list[int] = []
        self.offered: list[tuple[int, int]] = []

    def run(self, inputs: Arrays) -> Arrays:
        x = inputs["X"]
        self.ran_rows.append(x.shape[0])
        return {"Y": (x.sum(axis=1, keepdims=True) * 2).astype(np.float32)}

    def pin_host_memory(self, address: int, size: int) -> bool:
        self.offered.append((address, size))
        return False


def test_the_default_bucket_run_pads_with_the_last_row_and_keeps_the_rows_first():
    backend = Doubling()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = backend.run_bucket({"X": x}, 4)["Y"]
    assert backend.ran_rows == [4]
    np.testing.assert_array_equal(out[:3, 0], x.sum(axis=1) * 2)
    np.testing.assert_array_equal(out[3], out[2])  # the padding row repeats the last one
    assert pad_rows(x, 2) is x  # never trims


@pytest.fixture
def worker(monkeypatch):
    backend = Doubling()
    monkeypatch.setattr(serve.backends, "load_backend", lambda *args, **kwargs: backend)
    in_fd, out_fd = create_memfd("in", 1 << 20), create_memfd("out", 1 << 20)
    init = Init(IPC_VERSION, _model(), "m#1", "cpu", 1, 1, 1 << 20, None)
    worker = Worker(None, init, in_fd, out_fd)  # type: ignore[arg-type]
    parent_in, parent_out = Arena(in_fd, 1, 1 << 20), Arena(out_fd, 1, 1 << 20)
    os.close(in_fd)
    os.close(out_fd)
    yield worker, backend, parent_in, parent_out
    for arena in (parent_in, parent_out, worker.inputs, worker.outputs):
        arena.close()


@pytest.mark.parametrize(("rows", "bucket"), [(1, 1), (3, 4), (5, 8), (8, 8)])
def test_a_batch_runs_on_the_smallest_bucket_that_holds_it_and_returns_its_own_rows(
    worker, rows, bucket
):
    worker, backend, parent_in, parent_out = worker
    seen: list[int] = []

    def preprocess(arrays: Arrays) -> Arrays:
        seen.append(arrays["X"].shape[0])
        return arrays

    worker.processing.preprocess = preprocess
    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    refs = parent_in.write(0, [("X", Datatype.FP32, [x])])
    done = worker.run_batch(RunBatch(1, 0, rows, refs))
    assert isinstance(done, BatchDone)
    assert seen == [rows]  # pre-processing sees the batch's rows, not the padding
    assert backend.ran_rows == [bucket]  # the model runs the warmed shape
    (ref,) = done.outputs
    y = parent_out.read(0, ref, copy=True)
    assert y.shape == (rows, 1)
    np.testing.assert_allclose(y[:, 0], x.sum(axis=1) * 2, rtol=1e-6)


def test_the_worker_offers_its_input_arena_to_the_backend(worker):
    worker, backend, _, _ = worker
    ((address, size),) = backend.offered
    assert size == worker.inputs.size == 1 << 20
    assert address == worker.inputs.address_range()[0]


def test_outputs_that_cannot_be_written_fail_that_batch_and_the_worker_serves_the_next(worker):
    worker, _, parent_in, parent_out = worker
    worker.output_types = {**worker.output_types, "LABEL": Datatype.BYTES}
    worker.output_dtypes = {**worker.output_dtypes, "LABEL": np.dtype(object)}
    worker.output_dims = {**worker.output_dims, "LABEL": ()}
    labels = {1: "one"}  # a post-processing look-up that misses gives None

    def postprocess(outputs: Arrays) -> Arrays:
        rows = outputs["Y"].shape[0]
        return {**outputs, "LABEL": np.array([labels.get(rows)] * rows, dtype=object)}

    worker.processing.postprocess = postprocess
    x = np.ones((2, 4), np.float32)
    failed = worker.run_batch(RunBatch(5, 0, 2, parent_in.write(0, [("X", Datatype.FP32, [x])])))
    assert isinstance(failed, BatchFailed)
    assert (failed.batch_id, failed.kind) == (5, "execution")
    assert "cannot write the outputs" in failed.message and "NoneType" in failed.message
    done = worker.run_batch(RunBatch(6, 0, 1, parent_in.write(0, [("X", Datatype.FP32, [x[:1]])])))
    assert isinstance(done, BatchDone)
    label = next(ref for ref in done.outputs if ref.name == "LABEL")
    assert parent_out.read(0, label, copy=True).tolist() == [b"one"]


def test_data_the_preprocessing_refuses_is_the_callers_fault_not_the_workers(worker):
    worker, _, parent_in, _ = worker

    def preprocess(arrays: Arrays) -> Arrays:
        if (arrays["X"] < 0).any():
            raise InvalidInputError("X must be non-negative (an undecodable image, say)")
        if (arrays["X"] > 100).any():
            raise ValueError("a bug in the preprocessing")
        return arrays

    worker.processing.preprocess = preprocess
    x = np.ones((1, 4), np.float32)
    for batch_id, value, kind, text in (
        (1, -1.0, "invalid_input", "X must be non-negative (an undecodable image, say)"),
        (2, 101.0, "execution", "ValueError: a bug in the preprocessing"),
    ):
        refs = parent_in.write(0, [("X", Datatype.FP32, [x * value])])
        failed = worker.run_batch(RunBatch(batch_id, 0, 1, refs))
        assert isinstance(failed, BatchFailed)
        assert (failed.kind, failed.message) == (kind, text)
    done = worker.run_batch(RunBatch(3, 0, 1, parent_in.write(0, [("X", Datatype.FP32, [x])])))
    assert isinstance(done, BatchDone)
