"""ModelStreamInfer, as tritonclient's stream API drives it: every request on the stream gets
its own answer, a bad request gets an error for itself alone and the stream goes on; the same
through relay processes (``--frontends 2``), whose large requests go through their ring."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2

from serve.testing.models import build_identity_onnx, mlp_reference
from tests.integration.harness import ServerProcess, wait_until

pytestmark = pytest.mark.integration

ANSWER_TIMEOUT_S = 60.0


def _tensor(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _stream(
    url: str, requests: list[tuple[str, str, list[triton.InferInput]]]
) -> tuple[dict[str, Any], list[str]]:
    """Send (model, request id, inputs) on one stream; the results by id, and the errors."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = triton.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for model, request_id, inputs in requests:
            client.async_stream_infer(model, inputs, request_id=request_id)
        results, errors = {}, []
        for _ in requests:
            result, error = answers.get(timeout=ANSWER_TIMEOUT_S)
            if error is not None:
                errors.append(error.message())
            else:
                results[result.get_response().id] = result
        return results, errors
    finally:
        client.stop_stream()
        client.close()


def test_each_request_on_a_stream_gets_its_own_answer_and_a_bad_one_fails_alone(server):
    rng = np.random.default_rng(7)
    xs = {str(i): rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(24)}
    requests = [("mlp_onnx", i, [_tensor("INPUT0", x, "FP32")]) for i, x in xs.items()]
    bad = _tensor("INPUT0", np.zeros((1, 64), np.int32), "INT32")
    requests.insert(12, ("mlp_onnx", "bad", [bad]))
    requests.insert(5, ("nope", "unknown", [_tensor("INPUT0", xs["0"], "FP32")]))
    results, errors = _stream(server.url, requests)
    assert sorted(results) == sorted(xs)  # every good request answered, after the bad ones
    for request_id, x in xs.items():
        np.testing.assert_allclose(
            results[request_id].as_numpy("OUTPUT0"), mlp_reference(x), rtol=1e-4, atol=1e-5
        )
    assert len(errors) == 2
    assert any("expected datatype FP32, got INT32" in e and "INPUT0" in e for e in errors)
    assert any("unknown model 'nope'" in e for e in errors)


@pytest.fixture()
def relayed(tmp_path: Path):
    repository = tmp_path / "repository"
    build_identity_onnx(repository / "identity", types=("FP32",))
    server = ServerProcess(tmp_path / "server.log", repository, args=("--frontends", "2"))
    try:
        wait_until(server.ready_over_http, 120, "ready through the relays")
        yield server
    finally:
        server.stop()


def test_a_stream_through_a_relay_answers_small_and_ring_sized_requests(relayed):
    sizes = [5, 40_000, 3, 20_000, 7]  # 160 KB and 80 KB go through the relay's ring
    xs = {str(i): np.full((1, n), i + 0.5, dtype=np.float32) for i, n in enumerate(sizes)}
    requests = [("identity", i, [_tensor("IN_FP32", x, "FP32")]) for i, x in xs.items()]
    bad = _tensor("IN_FP32", np.zeros((1, 40_000), np.int32), "INT32")
    requests.insert(2, ("identity", "bad", [bad]))
    results, errors = _stream(relayed.url, requests)
    assert sorted(results) == sorted(xs)
    for request_id, x in xs.items():
        np.testing.assert_array_equal(results[request_id].as_numpy("OUT_FP32"), x)
    assert len(errors) == 1 and "IN_FP32" in errors[0] and "INT32" in errors[0]
    ring_calls = relayed.metric_total("warmserve_relay_ring_calls_total")
    assert ring_calls >= 3  # the two large good requests and the large bad one


def _raw_stream(url: str, messages: list[bytes]) -> list[Any]:
    """Every ModelStreamInferResponse for ``messages`` (serialised requests, or bytes that are
    not one), sent on one stream."""
    with grpc.insecure_channel(url) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        answers = call(iter(messages), timeout=ANSWER_TIMEOUT_S)
        return [service_pb2.ModelStreamInferResponse.FromString(a) for a in answers]


NOT_A_MESSAGE = b"\n\x08mlp"  # field 1 says 8 bytes follow; 3 do
MALFORMED = "malformed request message: "


def _bad_request(model: str, name: str, request_id: str) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name=name, datatype="INT32", shape=[1, 4])
    request.raw_input_contents.append(bytes(16))
    return request


@pytest.mark.parametrize("frontends", [1, 2], ids=["direct", "relayed"])
def test_a_failed_request_on_a_stream_fails_alone_named_by_its_id_even_one_that_does_not_parse(
    tmp_path: Path, frontends: int
):
    repository = tmp_path / "repository"
    build_identity_onnx(repository / "identity", types=("FP32",))
    args = ("--frontends", "2") if frontends > 1 else ()
    server = ServerProcess(tmp_path / "server.log", repository, args=args)
    try:
        wait_until(server.ready_over_http, 120, "ready")
        good = service_pb2.ModelInferRequest(model_name="identity", id="good")
        good.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, 4])
        good.raw_input_contents.append(bytes(16))
        requests = [
            _bad_request("identity", "IN_FP32", "req-7"),
            _bad_request("nope", "X", ""),
            good,
        ]
        messages = [r.SerializeToString() for r in requests]
        messages.insert(2, NOT_A_MESSAGE)  # fails alone too: the stream goes on
        answers = _raw_stream(server.url, messages)
        assert len(answers) == 4
        unparsed = [a.error_message for a in answers if a.error_message.startswith(MALFORMED)]
        assert len(unparsed) == 1 and "inference.ModelInferRequest" in unparsed[0]
        named = {
            a.infer_response.id: a.error_message
            for a in answers
            if not a.error_message.startswith(MALFORMED)
        }
        assert "INT32" in named["req-7"] and "unknown model 'nope'" in named[""]
        assert named["good"] == ""
        assert all(not a.infer_response.outputs for a in answers if a.error_message)
        # as Triton marks them: clients of decoupled models read until they see it
        for answer in answers:
            assert answer.infer_response.parameters["triton_final_response"].bool_param
    finally:
        server.stop()
