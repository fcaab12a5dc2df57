"""Health, metadata, model configuration and repository index over the real protocol."""

import re

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

DEMO = ("mlp_torch", "mlp_onnx", "image_cnn")
MODELS = (*DEMO, "identity", "identity_typed", "spin", "mlp_export", "mlp_spin", "untouched")


def test_live_ready_and_every_model_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    for name in MODELS:
        assert client.is_model_ready(name), name
    # Triton's contract: an unknown model or version is not ready, not an error
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("mlp_onnx", "7")


def test_server_metadata_names_the_extensions_served(client):
    meta = client.get_server_metadata()
    assert meta.name == "warmserve"
    assert {"model_configuration", "statistics"} <= set(meta.extensions)


def test_model_metadata_has_the_batch_dimension(client):
    meta = client.get_model_metadata("image_cnn")
    assert meta.platform == "pytorch_libtorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("IMAGE", "UINT8", [-1, 32, 32, 3])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("LOGITS", "FP32", [-1, 10])
    ]


def test_model_config_is_what_perf_analyzer_reads(client):
    config = client.get_model_config("mlp_onnx").config
    assert config.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in config.input] == [("INPUT0", [64])]
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8, 16, 32, 64]
    identity = client.get_model_config("identity").config
    types = {i.name: i.data_type for i in identity.input}
    assert types["IN_BYTES"] == model_config_pb2.TYPE_STRING
    assert types["IN_BOOL"] == model_config_pb2.TYPE_BOOL


def test_repository_index_lists_every_model_and_its_state(client):
    index = client.get_model_repository_index()
    states = {m.name: m.state for m in index.models}
    assert states == dict.fromkeys(MODELS, "READY")


def test_statistics_count_inferences(client):
    before = client.get_inference_statistics("mlp_onnx").model_stats[0].inference_count
    x = triton.InferInput("INPUT0", [3, 64], "FP32")
    x.set_data_from_numpy(np.zeros((3, 64), np.float32))
    client.infer("mlp_onnx", [x])
    stats = client.get_inference_statistics("mlp_onnx").model_stats[0]
    assert stats.inference_count == before + 3
    assert stats.inference_stats.success.count >= 1


def test_the_servers_own_warm_up_calls_are_not_counted(server, client):
    """Before readiness the front end warms its path with loopback ModelInfer calls to every
    model; statistics, latency windows and metrics start from zero after them."""
    stats = client.get_inference_statistics("untouched").model_stats[0]
    assert stats.inference_count == 0 and stats.execution_count == 0
    assert stats.inference_stats.success.count == 0
    _, latency = server.http_json("/warmserve/models/untouched/latency")
    assert latency["end_to_end"]["count"] == 0
    _, metrics = server.http_text("/metrics")
    assert 'warmserve_requests_total{code="ok",model="untouched"}' not in metrics
    assert 'warmserve_batch_rows_count{model="untouched"} 0.0' in metrics
    # counted apart, not dropped: a counter that went down would read as a restart
    assert 'warmserve_warm_up_requests_total{code="ok",model="untouched"}' in metrics


def test_an_rpc_not_served_answers_unimplemented(server):
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CudaSharedMemoryStatus(service_pb2.CudaSharedMemoryStatusRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert server.client.is_server_live()


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_system_shared_memory_status(),
        lambda c: c.register_system_shared_memory("region", "/warmserve-test", 64),
        lambda c: c.unregister_system_shared_memory(),
        lambda c: c.get_cuda_shared_memory_status(),
        lambda c: c.register_cuda_shared_memory("region", b"\0" * 64, 0, 64),
        lambda c: c.unregister_cuda_shared_memory(),
    ],
)
def test_shared_memory_rpcs_say_the_extension_is_not_supported(server, client, call):
    with pytest.raises(triton.InferenceServerException) as caught:
        call(client)
    assert caught.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "shared-memory extension is not supported" in caught.value.message()
    assert "NotImplementedError" not in server.log()  # not logged as a server error


def test_the_serving_process_imports_no_framework(server):
    maps = server.mapped_files()
    assert "libtorch" not in maps
    assert "onnxruntime" not in maps
    assert len(server.worker_pids()) == len(MODELS)


def test_the_serving_process_and_every_worker_freeze_their_long_lived_objects(server):
    """(serve/memory.py) Else each full collection walks start-up's objects: 18–30 ms."""
    assert re.search(r"serving process: \d{4,} long-lived objects frozen", server.log())
    frozen = re.findall(
        r"worker\[\S+ pid=\d+\] worker: \d{4,} long-lived objects frozen", server.log()
    )
    assert len(frozen) >= len(server.worker_pids())


def test_prometheus_metrics_count_outcomes_and_expose_pool_state(server, client):
    x = triton.InferInput("INPUT0", [1, 64], "FP32")
    x.set_data_from_numpy(np.zeros((1, 64), np.float32))
    client.infer("mlp_onnx", [x])
    bad = triton.InferInput("INPUT0", [1, 64], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 64), np.int32))
    with pytest.raises(triton.InferenceServerException):
        client.infer("mlp_onnx", [bad])
    status, text = server.http_text("/metrics")
    assert status == 200
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['warmserve_requests_total{code="ok",model="mlp_onnx"}'] >= 1
    assert samples['warmserve_requests_total{code="invalid_input",model="mlp_onnx"}'] >= 1
    assert samples['warmserve_workers_warm{model="mlp_onnx"}'] == 1
    assert samples['warmserve_queue_depth{model="mlp_onnx"}'] == 0
    assert samples['warmserve_request_duration_seconds_count{model="mlp_onnx"}'] >= 1
