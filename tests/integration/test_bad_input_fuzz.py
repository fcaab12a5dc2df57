"""Mutated requests, seeded: good requests of two models with one to three random defects each
(datatypes, shapes, raw and typed contents, names, parameters, outputs, row counts) or with their
serialised bytes damaged, some of them large enough for a relay's ring. Every call must end with
a status a client can act on (never INTERNAL, UNKNOWN or UNAVAILABLE), a stream must answer each
of its requests and go on, good calls in between must get their right answers, and the server
must log no error meanwhile: on a direct connection and through relay processes."""

from __future__ import annotations

import random
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from serve.testing.models import build_identity_onnx, build_mlp_onnx, mlp_reference
from tests.integration.harness import ServerProcess, wait_until

pytestmark = pytest.mark.integration

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
CALLS = 400
ACTIONABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # (a request given a timeout parameter of 1 µs)
}
TYPES = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16", "", "fp32"]
SIZES = {"BOOL": 1, "UINT8": 1, "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4}
RING_SIZED = 5000  # FP32 values: 20 KB, past a relay's RING_MIN_BYTES


@pytest.fixture(scope="module")
def relayed(tmp_path_factory) -> Any:
    """A server behind 2 relays, with the models the fuzz calls."""
    folder = tmp_path_factory.mktemp("fuzz_relayed")
    build_mlp_onnx(folder / "repository" / "mlp_onnx")
    build_identity_onnx(folder / "repository" / "identity")
    server = ServerProcess(folder / "server.log", folder / "repository", args=("--frontends", "2"))
    try:
        wait_until(server.ready_over_http, 120, "ready through the relays")
        yield server
    finally:
        server.stop()


def _good(model: str, rng: random.Random, typed: bool | None = None) -> Any:
    """A good request. The MLP's carry typed contents of 256 or 512 values (read from their
    packed run: serve/frontend/typed.py) if ``typed``, raw ones if not, and either (a quarter
    typed) by default."""
    request = service_pb2.ModelInferRequest(model_name=model, id=f"r{rng.randrange(1000)}")
    rows = rng.choice([1, 2, 3])
    if model == "mlp_onnx":
        typed = rng.random() < 0.25 if typed is None else typed
        rows = rng.choice([4, 8]) if typed else rows
        x = np.arange(rows * 64, dtype=np.float32).reshape(rows, 64) / 100
        tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 64])
        if typed:
            tensor.contents.fp32_contents.extend(x.ravel().tolist())
        else:
            request.raw_input_contents.append(x.tobytes())
        return request
    for datatype in ("FP32", "FP16", "INT64", "INT32", "UINT8", "BOOL", "BYTES"):
        n = RING_SIZED if datatype == "FP32" and rng.random() < 0.2 else 2
        request.inputs.add(name=f"IN_{datatype}", datatype=datatype, shape=[rows, n])
        if datatype == "BYTES":
            raw = b"".join(b"\x02\x00\x00\x00ab" for _ in range(rows * n))
        else:
            raw = bytes(rows * n * SIZES[datatype])
        request.raw_input_contents.append(raw)
    return request


def _mutate(request: Any, rng: random.Random) -> None:  # one branch a defect
    inputs, raw = request.inputs, request.raw_input_contents
    i = rng.randrange(len(inputs)) if len(inputs) else 0
    kind = rng.randrange(14)
    if kind == 0 and len(inputs):
        inputs[i].datatype = rng.choice(TYPES)
    elif kind == 1 and len(inputs):
        del inputs[i].shape[:]
        for _ in range(rng.choice([0, 1, 2, 3, 40])):
            inputs[i].shape.append(rng.choice([-1, 0, 1, 2, 64, 2**31, 2**62]))
    elif kind == 2 and len(raw):
        j = rng.randrange(len(raw))
        raw[j] = rng.choice([raw[j][: rng.randrange(len(raw[j]) + 1)], raw[j] + b"\x00", b""])
    elif kind == 3:  # typed contents of some field instead of raw
        del raw[:]
        for tensor in inputs:
            field = rng.choice(["fp32_contents", "int_contents", "int64_contents", "bool_contents"])
            values = getattr(tensor.contents, field)
            for _ in range(rng.choice([0, 2, 64])):
                values.append(True if field == "bool_contents" else rng.randrange(-(2**31), 2**31))
    elif kind == 4 and len(inputs):
        inputs[i].contents.fp32_contents.append(1.0)  # typed and raw at once
    elif kind == 5:
        parameter = request.parameters[rng.choice(["timeout", "sequence_id", "priority", "zz"])]
        choice = rng.randrange(3)
        if choice == 0:
            parameter.string_param = "10"
        elif choice == 1:
            parameter.int64_param = rng.choice([-1, 1, 2**62])
        else:
            parameter.bool_param = True
    elif kind == 6:
        output = request.outputs.add(name=rng.choice(["OUTPUT0", "OUT_FP32", "nope"]))
        if rng.random() < 0.3:
            output.parameters["classification"].int64_param = 3
    elif kind == 7 and len(inputs):
        inputs[i].name = rng.choice(["", "nope", "INPUT0", "IN_FP32"])
    elif kind == 8 and len(inputs):  # an input twice
        inputs.add().CopyFrom(inputs[i])
        if len(raw) > i:
            raw.append(raw[i])
    elif kind == 9 and len(inputs):  # an input missing
        del inputs[i]
        if len(raw) > i:
            del raw[i]
    elif kind == 10:
        request.model_name = rng.choice(["", "nope", "x" * 3000, "mlp_onnx\x00"])
    elif kind == 11:
        request.model_version = rng.choice(["2", "-1", "abc"])
    elif kind == 12 and len(raw):  # BYTES length prefixes that lie
        for tensor, j in zip(inputs, range(len(raw)), strict=False):
            if tensor.datatype == "BYTES":
                raw[j] = rng.choice([b"\xff\xff\xff\x7fab", b"\x02\x00\x00", b"\x05\x00\x00\x00ab"])
    elif len(inputs) and len(inputs[i].shape):  # rows past the limit, or none
        inputs[i].shape[0] = rng.choice([0, 65, 1000])


def _damage(data: bytes, rng: random.Random) -> bytes:
    damaged = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        if rng.random() < 0.5 and damaged:
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        else:
            del damaged[rng.randrange(len(damaged) + 1) :]
    return bytes(damaged)


def _bad_message(rng: random.Random) -> bytes:
    request = _good(rng.choice(["mlp_onnx", "identity"]), rng)
    if rng.random() < 0.3:
        return _damage(request.SerializeToString(), rng)
    for _ in range(rng.randrange(1, 4)):
        _mutate(request, rng)
    return bytes(request.SerializeToString())


@pytest.mark.parametrize("served", ["server", "relayed"], ids=["direct", "relayed"])
def test_mutated_requests_get_actionable_statuses_and_disturb_nothing(request, served: str):
    server: ServerProcess = request.getfixturevalue(served)
    rng = random.Random(20261129)
    logged = len(server.log())
    statuses: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary(MODEL_INFER)
        for n in range(CALLS):
            try:
                call(_bad_message(rng), timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                assert code in ACTIONABLE, (code, error.details())
            statuses[code] = statuses.get(code, 0) + 1
            if n % 50 == 0:  # a good call in between gets its right answer
                good = _good("mlp_onnx", rng, typed=n % 100 == 0)
                reply = service_pb2.ModelInferResponse.FromString(
                    call(good.SerializeToString(), timeout=30)
                )
                if good.raw_input_contents:
                    x = np.frombuffer(good.raw_input_contents[0], np.float32).reshape(-1, 64)
                else:
                    x = np.array(good.inputs[0].contents.fp32_contents, np.float32).reshape(-1, 64)
                y = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(-1, 10)
                np.testing.assert_allclose(y, mlp_reference(x), rtol=1e-4, atol=1e-5)
        messages = [_bad_message(rng) if k % 2 else _good("mlp_onnx", rng) for k in range(60)]
        wire = [m if isinstance(m, bytes) else m.SerializeToString() for m in messages]
        stream = channel.stream_stream(MODEL_STREAM_INFER)
        answers = list(stream(iter(wire), timeout=60))
    assert statuses.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > CALLS // 2  # the fuzz bit
    assert len(answers) == len(wire)  # one each, the stream going on past the bad ones
    answered = [service_pb2.ModelStreamInferResponse.FromString(a) for a in answers]
    good_ids = {m.id for m in messages if not isinstance(m, bytes)}
    assert good_ids <= {a.infer_response.id for a in answered if not a.error_message}
    assert not any("internal error" in a.error_message for a in answered)
    written = server.log()[logged:]
    assert " ERROR " not in written and "Traceback" not in written, written[-3000:]
    if served == "relayed":  # some of them, good and bad, went through the relays' rings
        assert server.metric_total("warmserve_relay_ring_calls_total") > 10
