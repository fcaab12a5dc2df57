"""What a rollout that fails to start answers: the model's own failure to load or warm up is
not retried by asking again (FAILED_PRECONDITION); a passing cause stays UNAVAILABLE."""

from __future__ import annotations

import asyncio

import pytest

from serve.bundles.repository import ModelSource
from serve.config import load_model_dir
from serve.errors import InvalidBundleError, ModelFaultError, ModelNotReadyError
from serve.pool.pool import WorkerPool
from serve.runtime import ModelStartFailedError, Runtime
from serve.testing.models import build_mlp_onnx

# what the pool raises when its workers' starts failed, as the worker reported each
MODELS_FAULT = (
    "model 'mlp': no worker warmed up: worker mlp#1 failed to start: start-up failed: "
    "the model failed to load or warm up: ValueError: output 'OUTPUT0' is FP64, the model "
    "config says FP32"
)
PASSING = (
    "worker mlp#1 not warm within 1.0 s",  # a host too busy to warm it in time
    "model 'mlp': no worker warmed up: [Errno 24] Too many open files",  # no process started
    "model 'mlp': no worker warmed up: worker mlp#1 failed to start: process exited with code -9",
)


def test_a_model_that_fails_its_warm_up_is_refused_as_the_models_fault_naming_the_cause(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(WorkerPool, "start", _failing(MODELS_FAULT, ModelFaultError))
    source = ModelSource(load_model_dir(build_mlp_onnx(tmp_path / "mlp", name="mlp")))
    with pytest.raises(ModelStartFailedError, match="did not become ready") as raised:
        asyncio.run(_rollout(source))
    assert isinstance(raised.value, InvalidBundleError)  # FAILED_PRECONDITION
    assert "FP64, the model config says FP32" in str(raised.value)  # the cause, named


@pytest.mark.parametrize("message", PASSING)
def test_a_version_that_fails_to_start_for_a_passing_cause_stays_unavailable(
    tmp_path, monkeypatch, message
):
    monkeypatch.setattr(WorkerPool, "start", _failing(message))
    source = ModelSource(load_model_dir(build_mlp_onnx(tmp_path / "mlp", name="mlp")))
    with pytest.raises(ModelNotReadyError, match="did not become ready") as raised:
        asyncio.run(_rollout(source))
    assert not isinstance(raised.value, InvalidBundleError)  # UNAVAILABLE: worth a retry


def _failing(message: str, error: type[ModelNotReadyError] = ModelNotReadyError):  # type: ignore[no-untyped-def]
    async def start(self: WorkerPool) -> None:
        raise error(message)

    return start


async def _rollout(source: ModelSource) -> None:
    runtime = Runtime([])
    try:
        await runtime.rollout(source, watch_s=0, keep_previous_s=0)
    finally:
        assert runtime.model_names() == []  # a first load that failed leaves nothing behind
        await runtime.stop()
