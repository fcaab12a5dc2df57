"""Device choice for the backends, exercised on CPU (the GPU path is in tests/gpu)."""

import logging

import pytest

from serve.backends.base import resolve_device, sample_inputs
from serve.backends.onnx import CUDA_PROVIDER, choose_providers
from serve.config import ModelConfig, TensorSpec


def test_onnx_falls_back_to_cpu_when_the_cuda_provider_is_missing(caplog):
    with caplog.at_level(logging.WARNING):
        device, providers = choose_providers(
            "cuda:1", ["AzureExecutionProvider", "CPUExecutionProvider"]
        )
    assert (device, providers) == ("cpu", ["CPUExecutionProvider"])
    assert "no CUDAExecutionProvider" in caplog.text


def test_onnx_uses_the_cuda_provider_on_the_requested_device_when_present():
    device, providers = choose_providers("cuda:1", [CUDA_PROVIDER, "CPUExecutionProvider"])
    assert device == "cuda:1"
    assert providers[0] == (CUDA_PROVIDER, {"device_id": 1})


@pytest.mark.parametrize(
    ("requested", "cuda", "expected"),
    [
        ("auto", True, "cuda:0"),
        ("auto", False, "cpu"),
        ("cpu", True, "cpu"),
        ("cuda:2", False, "cuda:2"),
    ],
)
def test_auto_means_the_first_gpu_when_there_is_one(requested, cuda, expected):
    assert resolve_device(requested, cuda) == expected


def test_warm_up_inputs_have_every_bucket_shape_and_datatype():
    model = ModelConfig(
        name="m",
        backend="onnx",
        model_file="x.onnx",
        inputs=(TensorSpec("A", "UINT8", (4, -1)), TensorSpec("B", "BYTES", (2,))),
        outputs=(TensorSpec("Y", "FP32", (1,)),),
        max_batch_size=8,
    )
    arrays = sample_inputs(model, 8)
    assert arrays["A"].shape == (8, 4, 1) and arrays["A"].dtype.name == "uint8"
    assert arrays["B"].shape == (8, 2) and arrays["B"].dtype == object


def test_warm_up_integer_inputs_are_zero_so_every_index_is_in_range():
    """Token ids and table indices: a random id could lie past a small table's end and fail
    warm-up (on CUDA: a device-side assert); zero is in range for every table."""
    model = ModelConfig(
        name="m",
        backend="torch",
        model_file="x.pt",
        inputs=(TensorSpec("IDS", "INT64", (16,)), TensorSpec("POS", "INT32", (16,))),
        outputs=(TensorSpec("Y", "FP32", (1,)),),
        max_batch_size=8,
    )
    arrays = sample_inputs(model, 8)
    assert arrays["IDS"].dtype.name == "int64" and arrays["POS"].dtype.name == "int32"
    assert not arrays["IDS"].any() and not arrays["POS"].any()
