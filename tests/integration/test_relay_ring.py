"""A relay's ring (relay_wire.RelayRing): a large ModelInfer's tensors go from the relay to the
serving process through shared memory, each call with its own bytes; a slot comes back when the
call's reply does, also for a call that was cancelled (even before the hub started it); and a
call that finds no free slot goes inline."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.relay import HubLink
from serve.frontend.relay_hub import RelayConnection, RelayHub
from serve.frontend.relay_wire import (
    MODEL_INFER,
    RELAY_VERSION,
    Hello,
    RelayCall,
    RelayCancel,
    RelayReply,
    RelayRing,
    from_hub_decoder,
    to_hub_decoder,
)
from serve.pool.arena import create_memfd
from serve.testing.models import build_identity_onnx
from tests.integration.harness import ServerProcess, wait_until

pytestmark = pytest.mark.integration

CANCELLED = 1  # grpc.StatusCode.CANCELLED
FLOATS = 8192  # 32 KiB per request: above the ring's threshold


def ring_calls(server: ServerProcess) -> float:
    return server.metric_total("warmserve_relay_ring_calls_total")


def echo(client: triton.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    tensor = triton.InferInput("IN_FP32", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer("identity", [tensor]).as_numpy("OUT_FP32")


def test_large_requests_come_through_the_ring_each_with_its_own_tensors(tmp_path: Path):
    repository = tmp_path / "repository"
    build_identity_onnx(repository / "identity", types=("FP32",))
    server = ServerProcess(
        tmp_path / "server.log",
        repository,
        args=("--frontends", "2"),
        env={"WARMSERVE_RELAY_RING_SLOTS": "2"},  # fewer slots than callers: some go inline
    )
    try:
        wait_until(server.ready_over_http, 120, "ready through the relays")
        failures: list[str] = []

        def caller(i: int) -> None:
            client = triton.InferenceServerClient(server.url, channel_args=[("test.conn", i)])
            try:
                for round_ in range(5):
                    x = np.random.default_rng(i * 100 + round_).random((1, FLOATS), np.float32)
                    if not np.array_equal(echo(client, x), x):
                        failures.append(f"caller {i} round {round_} got another call's tensor")
            finally:
                client.close()

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not failures
        # Every slot came back with its reply: one call at a time always finds a free one.
        before = ring_calls(server)
        x = np.arange(FLOATS, dtype=np.float32).reshape(1, -1)
        for _ in range(10):
            assert np.array_equal(echo(server.client, x), x)
        assert ring_calls(server) - before == 10
        small = np.ones((1, 5), dtype=np.float32)  # under the threshold: inline
        assert np.array_equal(echo(server.client, small), small)
        assert ring_calls(server) - before == 10
        # A bad large request gets the same clear error through the ring as inline.
        bad = pb.ModelInferRequest(model_name="identity")
        bad.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, FLOATS])
        bad.raw_input_contents.append(b"\0" * (4 * FLOATS - 4))
        with grpc.insecure_channel(server.url) as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as caught:
                infer(bad, timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"raw data has {4 * FLOATS - 4} bytes, expected {4 * FLOATS}" in (
            caught.value.details() or ""
        )
        assert ring_calls(server) - before == 11  # it came through the ring
    finally:
        assert server.stop() == 0


def _ring(slots: int = 2) -> RelayRing:
    fd = create_memfd("test-ring", slots * (1 << 20))
    try:
        return RelayRing(fd, slots, 1 << 20)
    finally:
        os.close(fd)


class Transport:
    """Collects what a protocol writes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def writelines(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.data += frame

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def messages(self, decoder: Any) -> list[Any]:
        out, pos = [], 0
        while pos < len(self.data):
            length = int.from_bytes(self.data[pos : pos + 4], "little")
            out.append(decoder.decode(bytes(self.data[pos + 4 : pos + 4 + length])))
            pos += 4 + length
        return out


def _request(raw: bytes) -> bytes:
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, len(raw) // 4])
    request.raw_input_contents.append(raw)
    return request.SerializeToString()


def test_the_relay_keeps_a_cancelled_calls_slot_until_the_hubs_reply():
    async def main() -> None:
        ring = _ring(slots=2)
        link = HubLink("unused", 0, 1 << 24, ring)
        transport = Transport()
        link.connection_made(transport)  # type: ignore[arg-type]
        raw = np.arange(FLOATS, dtype=np.float32).tobytes()
        call = asyncio.ensure_future(link.call(MODEL_INFER, _request(raw), None))
        await asyncio.sleep(0.01)
        (sent,) = [m for m in transport.messages(to_hub_decoder) if isinstance(m, RelayCall)]
        assert sent.ring is not None and ring.free == 1
        assert not pb.ModelInferRequest.FromString(sent.payload).raw_input_contents
        assert [bytes(part) for part in ring.parts(sent.ring)] == [raw]
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert any(isinstance(m, RelayCancel) for m in transport.messages(to_hub_decoder))
        assert ring.free == 1  # the hub may still be reading it
        link.received([RelayReply(sent.id, CANCELLED, "cancelled", b"")])
        assert ring.free == 2

    asyncio.run(main())


class Servicer:
    """Every method of the service; ModelInfer echoes how many raw inputs it was given."""

    def __getattr__(self, name: str) -> Any:
        async def method(request: Any, context: Any, raw: Any = None) -> Any:
            return pb.ModelInferResponse(id=str(len(raw or ())))

        return method


def test_the_hub_answers_a_ring_call_cancelled_before_it_started(tmp_path: Path):
    async def main() -> list[Any]:
        hub = RelayHub(Servicer(), Servicer(), tmp_path, 1 << 20)  # type: ignore[arg-type]
        hub.rings[0] = _ring()
        connection = RelayConnection(hub)
        transport = Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        payload = _request(b"")
        connection.received(
            [
                Hello(RELAY_VERSION, 0),
                RelayCall(7, MODEL_INFER, None, payload, [(0, 4)]),
                RelayCancel(7),  # in the same read: the call's task never ran
                RelayCall(8, MODEL_INFER, None, payload, [(4, 4)]),
            ]
        )
        await asyncio.sleep(0.01)
        assert hub.ring_calls == {0: 1}
        return transport.messages(from_hub_decoder)

    replies = asyncio.run(main())
    by_id = {r.id: r for r in replies}
    assert sorted((r.id, r.code) for r in replies) == [(7, CANCELLED), (8, 0)]
    assert pb.ModelInferResponse.FromString(by_id[8].payload).id == "1"  # its ring part


def test_a_request_larger_than_a_slot_goes_inline(tmp_path: Path):
    repository = tmp_path / "repository"
    build_identity_onnx(repository / "identity", types=("FP32",))
    env = {"WARMSERVE_RELAY_RING_SLOT_KIB": "24"}  # under the 32 KiB requests
    server = ServerProcess(tmp_path / "server.log", repository, args=("--frontends", "2"), env=env)
    try:
        wait_until(server.ready_over_http, 120, "ready through the relays")
        x = np.arange(FLOATS, dtype=np.float32).reshape(1, -1)
        assert np.array_equal(echo(server.client, x), x)
        assert ring_calls(server) == 0
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WARMSERVE_RELAY_RING_SLOTS": "-1"}, "WARMSERVE_RELAY_RING_SLOTS\\) must be >= 0"),
        ({"WARMSERVE_RELAY_RING_SLOT_KIB": "0"}, "WARMSERVE_RELAY_RING_SLOT_KIB\\) must be >= 1"),
        (
            {"WARMSERVE_RELAY_RING_SLOT_KIB": "lots"},
            "WARMSERVE_RELAY_RING_SLOT_KIB must be an integer",
        ),
    ],
)
def test_ring_settings_that_make_no_sense_are_refused_by_name(monkeypatch, env, message):
    from serve.config import server_config_from_env
    from serve.errors import ConfigError

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        server_config_from_env()


def test_the_default_ring_is_64_slots_of_1_mib(monkeypatch):
    from serve.config import server_config_from_env

    monkeypatch.delenv("WARMSERVE_RELAY_RING_SLOTS", raising=False)
    monkeypatch.delenv("WARMSERVE_RELAY_RING_SLOT_KIB", raising=False)
    config = server_config_from_env()
    assert (config.relay_ring_slots, config.relay_ring_slot_kib) == (64, 1024)
