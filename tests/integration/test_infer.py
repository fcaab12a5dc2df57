"""Inference with typed and raw contents, every datatype, and many concurrent callers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serve.testing.models import IMAGE_SHAPE, mlp_reference


def _input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.parametrize("model", ["mlp_onnx", "mlp_torch", "mlp_export", "mlp_spin"])
def test_mlp_raw_contents_match_the_reference(client, model):
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    result = client.infer(model, [_input("INPUT0", x, "FP32")])
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), mlp_reference(x), rtol=1e-4, atol=1e-5)
    assert result.get_response().model_version == "1"


def _typed_request(model: str, name: str, datatype: str, shape, field: str, values):
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


def _raw_output(response, index: int, dtype) -> np.ndarray:
    out = response.outputs[index]
    return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(list(out.shape))


@pytest.mark.parametrize("model", ["mlp_onnx", "mlp_torch"])
def test_mlp_typed_contents_match_the_reference(server, model):
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    request = _typed_request(model, "INPUT0", "FP32", [2, 64], "fp32_contents", x.ravel().tolist())
    with grpc.insecure_channel(server.url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.outputs[0].name == "OUTPUT0" and list(response.outputs[0].shape) == [2, 10]
    np.testing.assert_allclose(
        _raw_output(response, 0, "<f4"), mlp_reference(x), rtol=1e-4, atol=1e-5
    )


def test_image_cnn_matches_the_model_run_in_process(client, repository):
    images = np.random.default_rng(3).integers(0, 256, (3, *IMAGE_SHAPE), dtype=np.uint8)
    result = client.infer("image_cnn", [_input("IMAGE", images, "UINT8")])
    module = torch.jit.load(str(repository / "image_cnn" / "model.pt"))
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(result.as_numpy("LOGITS"), expected, rtol=1e-4, atol=1e-4)


IDENTITY_VALUES = {
    "FP32": np.array([[1.5, -2.25, 3.0]], dtype=np.float32),
    "FP16": np.array([[0.5, -1.0, 65504.0]], dtype=np.float16),
    "INT64": np.array([[-(2**40), 0, 2**40]], dtype=np.int64),
    "INT32": np.array([[-7, 0, 2**31 - 1]], dtype=np.int32),
    "UINT8": np.array([[0, 128, 255]], dtype=np.uint8),
    "BOOL": np.array([[True, False, True]]),
    "BYTES": np.array([[b"a", b"", "\u00e9t\u00e9".encode()]], dtype=np.object_),
}


def test_every_datatype_round_trips_raw(client):
    inputs = [_input(f"IN_{t}", v, t) for t, v in IDENTITY_VALUES.items()]
    result = client.infer("identity", inputs)
    for datatype, value in IDENTITY_VALUES.items():
        got = result.as_numpy(f"OUT_{datatype}")
        assert got.dtype == value.dtype, datatype
        np.testing.assert_array_equal(got, value, err_msg=datatype)


TYPED_FIELDS = {
    "FP32": "fp32_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "UINT8": "uint_contents",
    "BOOL": "bool_contents",
    "BYTES": "bytes_contents",
}


def test_every_typed_contents_field_round_trips(server):
    request = service_pb2.ModelInferRequest(model_name="identity_typed")
    for datatype, field in TYPED_FIELDS.items():
        tensor = request.inputs.add(name=f"IN_{datatype}", datatype=datatype, shape=[1, 3])
        getattr(tensor.contents, field).extend(IDENTITY_VALUES[datatype].ravel().tolist())
    with grpc.insecure_channel(server.url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    outputs = {out.name: i for i, out in enumerate(response.outputs)}
    for datatype, value in IDENTITY_VALUES.items():
        if datatype == "FP16":
            continue
        index = outputs[f"OUT_{datatype}"]
        assert response.outputs[index].datatype == datatype
        if datatype == "BYTES":
            raw = response.raw_output_contents[index]
            assert raw == b"".join(len(b).to_bytes(4, "little") + b for b in value.ravel())
        else:
            np.testing.assert_array_equal(_raw_output(response, index, value.dtype), value)


def test_fp16_sent_typed_is_refused_naming_the_input(server):
    request = _typed_request(
        "identity", "IN_FP16", "FP16", [1, 3], "fp32_contents", [1.0, 2.0, 3.0]
    )
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "IN_FP16" in caught.value.details() and "raw_input_contents" in caught.value.details()


@pytest.mark.parametrize("model", ["mlp_onnx", "mlp_spin"])
def test_concurrent_callers_with_distinct_inputs_get_their_own_rows(client, model):
    rng = np.random.default_rng(4)
    inputs = [rng.standard_normal((1 + i % 4, 64)).astype(np.float32) for i in range(400)]

    def call(x: np.ndarray) -> np.ndarray:
        return client.infer(model, [_input("INPUT0", x, "FP32")]).as_numpy("OUTPUT0")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, inputs))
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)


def test_concurrent_requests_of_different_lengths_each_get_their_own(client):
    def call(i: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.arange(1 + i % 5, dtype=np.int64).reshape(1, -1) + i
        inputs = [
            _input(f"IN_{t}", np.resize(v, (1, x.shape[1])).astype(v.dtype), t)
            for t, v in IDENTITY_VALUES.items()
            if t != "INT64"
        ]
        inputs.append(_input("IN_INT64", x, "INT64"))
        return x, client.infer("identity", inputs).as_numpy("OUT_INT64")

    with ThreadPoolExecutor(8) as pool:
        for sent, got in pool.map(call, range(100)):
            np.testing.assert_array_equal(got, sent)
