"""Device choice for the backends, exercised on CPU (the GPU path is in tests/gpu)."""

import msgspec
import onnxruntime as ort
import pytest

from serve.backends import onnx
from serve.backends.base import DeviceUnavailableError, load_backend, resolve_device, sample_inputs
from serve.backends.onnx import CUDA_PROVIDER, check_session_device, choose_providers
from serve.config import ModelConfig, TensorSpec, load_model_dir
from serve.runtime import Runtime
from serve.testing.models import build_mlp_onnx

CPU_ONLY_ORT = pytest.mark.skipif(
    CUDA_PROVIDER in ort.get_available_providers(),
    reason="this onnxruntime has a CUDA provider: a CUDA device would load",
)


def test_onnx_refuses_a_cuda_device_when_the_cuda_provider_is_missing():
    with pytest.raises(DeviceUnavailableError, match=r"cuda:1 .*no CUDAExecutionProvider"):
        choose_providers("cuda:1", ["AzureExecutionProvider", "CPUExecutionProvider"])


def test_onnx_auto_runs_on_cpu_when_the_cuda_provider_is_missing():
    device, providers = choose_providers("auto", ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert (device, providers) == ("cpu", ["CPUExecutionProvider"])


def test_a_cuda_session_that_fell_back_to_cpu_is_refused():
    check_session_device("cuda:0", [CUDA_PROVIDER, "CPUExecutionProvider"])  # it got CUDA
    check_session_device("cpu", ["CPUExecutionProvider"])  # it asked for CPU
    with pytest.raises(DeviceUnavailableError, match="did not start"):
        check_session_device("cuda:0", ["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory) -> ModelConfig:
    return load_model_dir(build_mlp_onnx(tmp_path_factory.mktemp("models") / "mlp", name="mlp"))


@CPU_ONLY_ORT
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_onnx_fails_the_load_when_the_cuda_provider_does_not_start(monkeypatch, mlp_onnx):
    """onnxruntime-gpu lists its CUDA provider even where it cannot start (no driver, a broken
    one): the session then runs on CPU with only a log line. Here: a CPU build that claims
    the provider, whose session falls back the same way."""
    monkeypatch.setattr(
        onnx.ort, "get_available_providers", lambda: [CUDA_PROVIDER, "CPUExecutionProvider"]
    )
    with pytest.raises(DeviceUnavailableError, match="CUDAExecutionProvider did not start"):
        load_backend(mlp_onnx, "cuda:0", 1)


@CPU_ONLY_ORT
def test_require_gpu_fails_an_auto_onnx_model_naming_the_model_and_the_setting(mlp_onnx):
    with pytest.raises(DeviceUnavailableError) as caught:
        load_backend(mlp_onnx, "auto", 1, require_gpu=True)
    message = str(caught.value)
    assert "model 'mlp' must run on a GPU" in message
    assert "WARMSERVE_REQUIRE_GPU is set" in message
    assert "no CUDAExecutionProvider" in message


@CPU_ONLY_ORT
def test_without_require_gpu_auto_runs_on_cpu_and_require_gpu_leaves_cpu_models_alone(mlp_onnx):
    assert load_backend(mlp_onnx, "auto", 1).device == "cpu"
    assert load_backend(mlp_onnx, "cpu", 1, require_gpu=True).device == "cpu"


def test_require_gpu_fails_an_auto_torch_model_when_torch_sees_no_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device: the model would load on it")
    model = ModelConfig(
        name="t",
        backend="torch",
        model_file="never_read.pt",
        inputs=(TensorSpec("X", "FP32", (4,)),),
        outputs=(TensorSpec("Y", "FP32", (1,)),),
    )
    with pytest.raises(
        DeviceUnavailableError, match=r"model 't' must run on a GPU.*no CUDA device"
    ):
        load_backend(model, "auto", 1, require_gpu=True)


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
        ("cuda", True, "cuda:0"),
        ("cuda", False, "cuda:0"),  # (refused by the backend, naming cuda:0)
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


def test_require_gpu_reaches_the_workers_of_every_model_the_runtime_serves(mlp_onnx):
    other = msgspec.structs.replace(mlp_onnx, name="other", device="cpu")
    for require_gpu in (True, False):
        runtime = Runtime([mlp_onnx, other], require_gpu=require_gpu)
        settings = [service.pool.settings for service in runtime.services()]
        assert [(s.device, s.require_gpu) for s in settings] == [
            ("auto", require_gpu),
            ("cpu", require_gpu),  # the worker keeps a "cpu" model on CPU regardless
        ]
