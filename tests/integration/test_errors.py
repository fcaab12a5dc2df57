"""Bad input gets the right status and a message naming the problem; nothing else is harmed."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serve.protocol.datatypes import Datatype, numpy_dtype
from serve.testing.models import (
    IDENTITY_TYPES,
    build_identity_onnx,
    build_mlp_onnx,
    build_spin_torch,
    mlp_reference,
)
from tests.integration.conftest import merged_behind_a_busy_worker, spin_inputs
from tests.integration.harness import ServerProcess, wait_until


def _input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _status(call) -> tuple[str, str]:
    with pytest.raises(triton.InferenceServerException) as caught:
        call()
    return str(caught.value.status()), caught.value.message()


def test_unknown_model_is_not_found(client):
    x = _input("INPUT0", np.zeros((1, 64), np.float32), "FP32")
    status, message = _status(lambda: client.infer("nope", [x]))
    assert status == "StatusCode.NOT_FOUND" and "'nope'" in message


@pytest.mark.parametrize(
    ("name", "array", "datatype", "expected"),
    [
        ("INPUT0", np.zeros((1, 64), np.int32), "INT32", "expected datatype FP32, got INT32"),
        ("INPUT0", np.zeros((1, 63), np.float32), "FP32", "expected shape [-1, 64], got [1, 63]"),
        ("INPUT0", np.zeros((64,), np.float32), "FP32", "expected shape [-1, 64], got [64]"),
        ("INPUT0", np.zeros((65, 64), np.float32), "FP32", "batch size 65 is outside 1..64"),
        ("WRONG", np.zeros((1, 64), np.float32), "FP32", "has no input 'WRONG'"),
    ],
)
def test_wrong_input_is_invalid_argument_naming_it(client, name, array, datatype, expected):
    status, message = _status(lambda: client.infer("mlp_onnx", [_input(name, array, datatype)]))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert expected in message
    assert name in message


def test_an_input_in_shared_memory_is_refused_not_read_as_empty(client):
    spin = spin_inputs(1)  # two inputs: the other one still sent raw
    spin[0].set_shared_memory("region", 512 * 4)
    status, message = _status(lambda: client.infer("spin", spin))
    assert status == "StatusCode.UNIMPLEMENTED"
    assert "input 'X' is in a shared-memory region" in message
    assert "not supported" in message


def test_an_output_asked_for_in_shared_memory_is_refused_not_answered_elsewhere(client):
    x = _input("INPUT0", np.zeros((1, 64), np.float32), "FP32")
    output = triton.InferRequestedOutput("OUTPUT0")
    output.set_shared_memory("region", 10 * 4)
    status, message = _status(lambda: client.infer("mlp_onnx", [x], outputs=[output]))
    assert status == "StatusCode.UNIMPLEMENTED"
    assert "output 'OUTPUT0' is asked for in a shared-memory region" in message


def test_bytes_that_are_not_utf8_for_an_onnx_string_input_are_the_callers_error(client):
    inputs = [
        _input(f"IN_{t}", np.zeros((1, 2), numpy_dtype(Datatype(t))), t)
        for t in IDENTITY_TYPES
        if t != "BYTES"
    ]
    inputs.append(_input("IN_BYTES", np.array([[b"ok", b"\xff\xfe"]], dtype=np.object_), "BYTES"))
    status, message = _status(lambda: client.infer("identity", inputs))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "input 'IN_BYTES'" in message and "not UTF-8" in message


def _raw_call(server, request) -> grpc.RpcError:
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    return caught.value


def test_raw_byte_size_that_does_not_match_the_shape_is_refused(server):
    request = service_pb2.ModelInferRequest(model_name="mlp_onnx")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(b"\x00" * 255)
    error = _raw_call(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'INPUT0': raw data has 255 bytes, expected 256" in error.details()


def test_typed_element_count_that_does_not_match_the_shape_is_refused(server):
    request = service_pb2.ModelInferRequest(model_name="mlp_onnx")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend([0.0] * 10)
    error = _raw_call(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "input 'INPUT0': shape [1, 64] needs 64 elements, fp32_contents has 10" in error.details()
    )


def test_malformed_bytes_and_unknown_datatype_are_refused(server):
    request = service_pb2.ModelInferRequest(model_name="identity")
    request.inputs.add(name="IN_BYTES", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\x09\x00\x00\x00abc")
    error = _raw_call(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "IN_BYTES" in error.details()
    request = service_pb2.ModelInferRequest(model_name="identity")  # 2**40 elements claimed
    request.inputs.add(name="IN_BYTES", datatype="BYTES", shape=[1, 2**40])
    request.raw_input_contents.append(b"\x00" * 8)
    error = _raw_call(server, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot hold" in error.details()
    request = service_pb2.ModelInferRequest(model_name="mlp_onnx")
    request.inputs.add(name="INPUT0", datatype="FLOAT32", shape=[1, 64])
    request.raw_input_contents.append(b"\x00" * 256)
    error = _raw_call(server, request)
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown datatype" in error.details()
    )


def test_bytes_that_are_not_a_request_message_are_invalid_argument_not_an_error_logged(server):
    """gRPC's own parser would answer UNKNOWN and log a traceback for each such call."""
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\n\x08mlp", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "malformed request message: Error parsing message with type 'inference.ModelInferRequest'"
    )
    assert "DecodeError" not in server.log()


def test_a_missing_input_is_named(client):
    status, message = _status(
        lambda: client.infer("spin", [_input("X", np.zeros((1, 512), np.float32), "FP32")])
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and "expects input 'ITERS'" in message


def test_a_model_error_fails_that_call_only_and_the_worker_lives_on(server, client):
    pids = server.worker_pids()
    status, message = _status(lambda: client.infer("spin", spin_inputs(-1)))
    assert status == "StatusCode.INTERNAL" and "ITERS must be non-negative" in message
    assert client.infer("spin", spin_inputs(1, value=3.0)).as_numpy("Y").tolist() == [[3.0]]
    assert server.worker_pids() == pids


def test_bad_requests_never_disturb_good_ones(client, server):
    pids = server.worker_pids()
    x = np.random.default_rng(9).standard_normal((2, 64)).astype(np.float32)
    for _ in range(3):
        _status(lambda: client.infer("mlp_onnx", [_input("INPUT0", x[:, :10].copy(), "FP32")]))
        got = client.infer("mlp_onnx", [_input("INPUT0", x, "FP32")]).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
    assert server.worker_pids() == pids


def test_a_model_that_cannot_load_is_unavailable_while_others_serve(tmp_path):
    build_mlp_onnx(tmp_path / "repo" / "good", name="good")
    broken = build_mlp_onnx(tmp_path / "repo" / "broken", name="broken")
    (broken / "model.onnx").write_bytes(b"this is not an onnx file")
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_live()
        server.wait_for_log("model broken failed to load")
        client = server.client
        # readiness opens once every model has finished starting (and the front end is warm)
        wait_until(lambda: client.is_model_ready("good"), 60, "the good model ready")
        assert not client.is_model_ready("broken")
        assert not client.is_server_ready()
        x = _input("INPUT0", np.zeros((1, 64), np.float32), "FP32")
        status, message = _status(lambda: client.infer("broken", [x]))
        assert status == "StatusCode.UNAVAILABLE" and "not ready" in message
        client.infer("good", [x])
        index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
        assert index["good"] == ("READY", "")
        assert index["broken"][0] == "UNAVAILABLE" and "start-up failed" in index["broken"][1]
    finally:
        assert server.stop() == 0


def test_one_bad_request_merged_with_good_ones_fails_alone(tmp_path):
    # Requests queued behind a busy worker leave as one batch; one of them the model rejects
    # (negative ITERS). Only that caller gets the error: the batcher runs the failed batch's
    # requests again one by one, and the others get their own results.
    build_spin_torch(tmp_path / "repo" / "spin", max_batch_size=8, batching={"max_queue_size": 16})
    server = ServerProcess(
        tmp_path / "server.log", tmp_path / "repo", args=("--log-level", "DEBUG")
    )
    try:
        server.wait_ready()
        outcomes = merged_behind_a_busy_worker(server, [(1, 2.0), (-1, 3.0), (1, 4.0)])
        for value in (1.0, 2.0, 4.0):
            result, error = outcomes[value]
            assert error is None, f"{value}: {error}"
            assert result.as_numpy("Y").tolist() == [[value]]
        _, error = outcomes[3.0]
        assert error is not None and "ITERS must be non-negative" in error.message()
        assert "running each on its own" in server.log()
    finally:
        assert server.stop() == 0


def _metric(server, sample: str) -> float:
    _, text = server.http_text("/metrics")
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _failed(client, model: str) -> int:
    return int(client.get_inference_statistics(model).model_stats[0].inference_stats.fail.count)


def _executions(client, model: str) -> int:
    return int(client.get_inference_statistics(model).model_stats[0].execution_count)


def _wait_for_executions(client, model: str, count: int) -> None:
    """Until ``model`` has run ``count`` batches: a batch whose caller gave up still runs to its
    end in the worker, and must not run into the next test's figures (the session server is
    shared)."""
    wait_until(lambda: _executions(client, model) >= count, 30, f"{model}'s batches done")


def test_a_malformed_request_counts_as_that_models_invalid_input(server, client):
    """A request refused by the wire-format checks (here: raw bytes that do not fit the shape)
    is counted like one refused by the signature check: metrics and failure statistics."""
    invalid = 'warmserve_requests_total{code="invalid_input",model="identity"}'
    before, failed = _metric(server, invalid), _failed(client, "identity")
    request = service_pb2.ModelInferRequest(model_name="identity")
    request.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\x00" * 15)
    assert _raw_call(server, request).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _metric(server, invalid) == before + 1
    assert _failed(client, "identity") == failed + 1


def test_a_call_that_runs_past_its_deadline_is_counted_as_deadline_exceeded(
    server, client, spin_iters
):
    """gRPC ends a call at its deadline by cancelling its handler: it is still counted, as
    deadline_exceeded, and in the failure statistics."""
    expired = 'warmserve_requests_total{code="deadline_exceeded",model="spin"}'
    before, failed = _metric(server, expired), _failed(client, "spin")
    executed = _executions(client, "spin")
    status, _ = _status(
        lambda: client.infer("spin", spin_inputs(spin_iters(3.0)), client_timeout=0.5)
    )
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    wait_until(lambda: _metric(server, expired) >= before + 1, 30, "the expired call counted")
    assert _metric(server, expired) == before + 1
    assert _failed(client, "spin") == failed + 1
    _wait_for_executions(client, "spin", executed + 1)  # the expired call's batch ran on


def test_a_request_whose_timeout_parameter_passes_while_queued_fails_and_is_never_computed(
    server, client, spin_iters
):
    """Triton's ``timeout`` request parameter (µs; tritonclient's ``timeout=``), with no gRPC
    deadline: a request queued behind two long ones fails DEADLINE_EXCEEDED once it passes,
    saying so, and is never computed; a later one whose timeout is not reached is answered."""
    expired = 'warmserve_requests_total{code="deadline_exceeded",model="spin"}'
    before, executed = _metric(server, expired), _executions(client, "spin")
    results: queue.Queue[tuple[str, object]] = queue.Queue()
    for name in ("long", "queued"):  # (spin: one worker, one row a batch)
        client.async_infer(
            "spin",
            spin_inputs(spin_iters(1.0)),
            lambda result, error, name=name: results.put((name, error)),
        )
    depth = 'warmserve_queue_depth{model="spin"}'
    wait_until(lambda: _metric(server, depth) >= 1, 30, "one long call computing, one queued")
    status, message = _status(
        lambda: client.infer("spin", spin_inputs(1), timeout=300_000)  # 0.3 s
    )
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    assert "did not finish within its deadline: its 'timeout' parameter (300000 µs)" in message
    assert _metric(server, expired) == before + 1
    answered = client.infer("spin", spin_inputs(1, 7.0), timeout=30_000_000)  # queued behind
    assert answered.as_numpy("Y") is not None
    assert sorted(results.get(timeout=30) for _ in range(2)) == [("long", None), ("queued", None)]
    # the two long calls and the last one ran; the expired one, queued before the last, did not
    _wait_for_executions(client, "spin", executed + 3)
    assert _executions(client, "spin") == executed + 3


def test_a_call_its_caller_cancels_is_counted_as_cancelled(server, client, spin_iters):
    """Two slow calls to spin (one batch at a time), cancelled by their caller once one of them
    waits in the queue: that one at least reached the server, and is counted as cancelled and
    as a failure (the other may not have reached it yet, if spin was still busy)."""
    cancelled = 'warmserve_requests_total{code="cancelled",model="spin"}'
    before, failed = _metric(server, cancelled), _failed(client, "spin")
    executed = _executions(client, "spin")
    errors: queue.Queue[object] = queue.Queue()
    calls = [
        client.async_infer(
            "spin", spin_inputs(spin_iters(2.0)), lambda result, error: errors.put(error)
        )
        for _ in range(2)
    ]
    depth = 'warmserve_queue_depth{model="spin"}'
    wait_until(lambda: _metric(server, depth) >= 1, 30, "a call queued")
    for call in calls:
        call.cancel()
    wait_until(lambda: _metric(server, cancelled) >= before + 1, 30, "the queued call counted")
    assert _failed(client, "spin") >= failed + 1
    assert all("CANCELLED" in str(errors.get(timeout=30)) for _ in calls)
    _wait_for_executions(client, "spin", executed + 1)  # the one computing ran on


def test_an_answer_larger_than_the_server_may_send_is_refused_and_counted(tmp_path):
    # gRPC failed such a call RESOURCE_EXHAUSTED after the handler, logging an ERROR with a
    # traceback (ExecuteBatchError), and the call was counted as answered
    repository = tmp_path / "repository"
    folder = build_identity_onnx(
        repository / "grow", name="grow", types=("FP32",), process="process.py"
    )
    (folder / "process.py").write_text(
        "import numpy as np\n\n\ndef postprocess(outputs):\n"
        "    return {'OUT_FP32': np.tile(outputs['OUT_FP32'], (1, 4))}\n"
    )
    limit = 512 * 1024
    args = ("--max-message-bytes", str(limit))
    server = ServerProcess(tmp_path / "server.log", repository, args=args)
    try:
        server.wait_ready()
        small = triton.InferInput("IN_FP32", [1, 1024], "FP32")  # a 16 KiB answer
        small.set_data_from_numpy(np.ones((1, 1024), np.float32))
        assert server.client.infer("grow", [small]).as_numpy("OUT_FP32").shape == (1, 4096)
        large = triton.InferInput("IN_FP32", [1, 65536], "FP32")  # 256 KiB in, 1 MiB out
        large.set_data_from_numpy(np.ones((1, 65536), np.float32))
        with pytest.raises(triton.InferenceServerException) as refused:
            server.client.infer("grow", [large])
        assert str(refused.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
        assert f"({limit} bytes, max_message_bytes)" in refused.value.message()
        _, metrics = server.http_text("/metrics")
        assert 'warmserve_requests_total{code="answer_too_large",model="grow"} 1.0' in metrics
        assert "ExecuteBatchError" not in server.log()
    finally:
        assert server.stop() == 0
