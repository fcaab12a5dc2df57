"""The in-flight request budget in a real server: a burst that would take the request bytes held
over --max-inflight-bytes is refused RESOURCE_EXHAUSTED at once (unary calls and stream requests,
direct and relayed), the calls already admitted succeed, and the gauge returns to 0. Answers a
client does not read hold the budget until gRPC has sent them."""

from __future__ import annotations

import queue
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.frontend.admission import ANSWER_COPIES
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import build_identity_onnx, build_spin_torch
from tests.integration.conftest import spin_inputs
from tests.integration.harness import ServerProcess, wait_until
from tests.integration.test_frontends import iterations_for

# A spin request (X FP32 [1, 512], ITERS INT64 [1, 1], raw contents) holds its 2056 bytes twice
# (the message's copy and the decoded one) and reserves its answer's (Y FP32 [1, 1]): room for
# exactly three.
REQUEST_BYTES = 2 * (512 * 4 + 8) + ANSWER_COPIES * 4
BUDGET = 3 * REQUEST_BYTES
HELD = "warmserve_inflight_request_bytes"
REFUSED = 'warmserve_requests_total{code="inflight_bytes_full",model="spin"}'
DISPATCH = "model spin: dispatching"


def _metric(server: ServerProcess, sample: str) -> float:
    _, text = server.http_text("/metrics")
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in /metrics")


def _queue_one(server: ServerProcess, results: queue.Queue, iters: int, waiting: int) -> None:
    """Send a call and return once it waits in the batcher as the ``waiting``-th request."""
    line = f"model spin: {waiting} requests wait for a worker"
    before = server.count_log(line)
    server.client.async_infer(
        "spin", spin_inputs(iters), lambda result, error: results.put((result, error))
    )
    server.wait_for_log_count(line, before + 1)


@pytest.mark.parametrize("frontends", [1, 2], ids=["direct", "relayed"])
def test_a_burst_over_the_budget_is_refused_while_admitted_calls_succeed(
    tmp_path: Path, frontends: int
):
    repository = tmp_path / "repository"
    build_spin_torch(repository / "spin")  # one worker, one row a batch, 4 requests queued
    args = ("--frontends", str(frontends), "--log-level", "DEBUG")
    args += ("--max-inflight-bytes", str(BUDGET))
    server = ServerProcess(tmp_path / "server.log", repository, args=args)
    try:
        wait_until(server.ready_over_http, 120, "ready")
        assert _metric(server, HELD + "_limit") == BUDGET
        client = server.client
        iters = iterations_for(server, 5.0)
        admitted: queue.Queue = queue.Queue()
        dispatched = server.count_log(DISPATCH)
        client.async_infer(
            "spin", spin_inputs(iters), lambda result, error: admitted.put((result, error))
        )
        server.wait_for_log_count(DISPATCH, dispatched + 1)  # computing, for seconds
        _queue_one(server, admitted, 1, 1)
        _queue_one(server, admitted, 1, 2)
        assert _metric(server, HELD) == BUDGET  # the three admitted hold it all

        burst: queue.Queue = queue.Queue()
        for _ in range(4):
            client.async_infer(
                "spin", spin_inputs(1), lambda result, error: burst.put((result, error))
            )
        refusals = [burst.get(timeout=60) for _ in range(4)]
        streamed: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: streamed.put((result, error)))
        try:
            client.async_stream_infer("spin", spin_inputs(1), request_id="streamed")
            refusals.append(streamed.get(timeout=60))
        finally:
            client.stop_stream()

        for result, error in refusals:
            assert result is None and error is not None
            assert "bytes of requests and unsent answers in flight" in error.message()
            assert f"(limit {BUDGET}" in error.message()
        assert [str(e.status()) for _, e in refusals[:4]] == ["StatusCode.RESOURCE_EXHAUSTED"] * 4

        outcomes = [admitted.get(timeout=120) for _ in range(3)]
        assert [e for _, e in outcomes] == [None] * 3, "the admitted calls are unharmed"
        # (an answer holds its share until gRPC's done callback, which can come a moment after
        # the client has the answer)
        wait_until(lambda: _metric(server, HELD) == 0, 30, "the budget released")
        assert _metric(server, REFUSED) == 5
        client.infer("spin", spin_inputs(1))  # the budget is free again
        wait_until(lambda: _metric(server, HELD) == 0, 30, "the budget released again")
    except triton.InferenceServerException as exc:
        raise AssertionError(f"{exc}\n{server.log()[-4000:]}") from exc
    finally:
        assert server.stop() == 0


# --- answers a client does not read ---------------------------------------------------------------

ANSWER_ELEMENTS = 1 << 16  # an FP32 [1, 65536] input echoed: a 256 KiB answer
ANSWER_HELD = ANSWER_COPIES * 4 * ANSWER_ELEMENTS  # what an unsent answer holds
REQUEST_HELD = 2 * 4 * ANSWER_ELEMENTS  # a request, while computed (raw: twice)
# The echo's answers vary in size (its config says [-1]): once one is made, each request also
# reserves an answer like it (PlainCodec.learn_answer). Three unsent answers leave room for a
# request, but not for the answer it reserves besides.
ANSWER_BUDGET = 4 * ANSWER_HELD + REQUEST_HELD - 1


class _NonReadingClient:
    """A raw HTTP/2 connection whose streams have a receive window of 0: the server can send
    none of their answers (a stuck or hostile client that opens calls and never reads)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        settings = struct.pack(">HI", 0x4, 0)  # SETTINGS_INITIAL_WINDOW_SIZE = 0
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(0x4, 0, 0, settings))
        while True:  # the server's SETTINGS, to acknowledge
            kind, flags, _ = self._read_frame()
            if kind == 0x4 and not flags & 0x1:
                break
        self.sock.sendall(_frame(0x4, 0x1, 0, b""))
        self.stream = 1

    def _read_frame(self) -> tuple[int, int, bytes]:
        header = self._read(9)
        length = int.from_bytes(header[:3], "big")
        return header[3], header[4], self._read(length)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return data

    def _open(self, method: str) -> int:
        headers = b"".join(
            _literal(name, value)
            for name, value in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", f"/inference.GRPCInferenceService/{method}"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        stream, self.stream = self.stream, self.stream + 2
        self.sock.sendall(_frame(0x1, 0x4, stream, headers))
        return stream

    def _send(self, stream: int, request: bytes, last: bool) -> None:
        message = b"\x00" + struct.pack(">I", len(request)) + request
        self.sock.sendall(_frame(0x0, 0x1 if last else 0x0, stream, message))

    def infer(self, request: bytes) -> None:
        self._send(self._open("ModelInfer"), request, last=True)

    def open_stream(self) -> int:
        """A ModelStreamInfer stream, left open for its requests (``send``)."""
        return self._open("ModelStreamInfer")

    def send(self, stream: int, request: bytes) -> None:
        self._send(stream, request, last=False)

    def close(self) -> None:
        self.sock.close()


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload
    )


def _literal(name: str, value: str) -> bytes:  # HPACK: a literal header, not indexed
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def _echo_request() -> bytes:
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, ANSWER_ELEMENTS])
    request.raw_input_contents.append(np.ones((1, ANSWER_ELEMENTS), np.float32).tobytes())
    return bytes(request.SerializeToString())


def _echo_inputs() -> list[triton.InferInput]:
    tensor = triton.InferInput("IN_FP32", [1, ANSWER_ELEMENTS], "FP32")
    tensor.set_data_from_numpy(np.ones((1, ANSWER_ELEMENTS), np.float32))
    return [tensor]


@pytest.mark.parametrize("stream", [False, True])
def test_answers_a_client_does_not_read_hold_the_budget_until_sent(tmp_path: Path, stream: bool):
    # gRPC keeps an answer its client does not read; a few such clients took the serving
    # process to gigabytes while the budget, released when the handler returned, showed 0.
    # A stream's answers (up to 256 of its requests in flight) count the same way.
    repository = tmp_path / "repository"
    build_identity_onnx(repository / "echo", name="echo", types=("FP32",))
    args = ("--max-inflight-bytes", str(ANSWER_BUDGET))
    server = ServerProcess(tmp_path / "server.log", repository, args=args)
    stuck = None
    try:
        wait_until(server.ready_over_http, 120, "ready")
        stuck = _NonReadingClient(server.port)
        opened = stuck.open_stream() if stream else 0
        for unsent in range(1, 4):
            if stream:
                stuck.send(opened, _echo_request())
            else:
                stuck.infer(_echo_request())
            wait_until(
                lambda n=unsent: _metric(server, HELD) == n * ANSWER_HELD,
                30,
                f"{unsent} unsent answers held in the budget",
            )
        with pytest.raises(triton.InferenceServerException) as refused:
            server.client.infer("echo", _echo_inputs())
        assert str(refused.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
        assert "unsent answers" in refused.value.message()

        stuck.close()  # gRPC drops the answers with the connection: the budget is free again
        stuck = None
        wait_until(lambda: _metric(server, HELD) == 0, 30, "the budget released")
        result = server.client.infer("echo", _echo_inputs())
        assert result.as_numpy("OUT_FP32").shape == (1, ANSWER_ELEMENTS)
        # gRPC's ERROR with a traceback for each answer it could not send is one INFO line
        assert "Traceback" not in server.log() and "ERROR" not in server.log()
    finally:
        if stuck is not None:
            stuck.close()
        assert server.stop() == 0
