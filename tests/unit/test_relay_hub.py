"""The hub's answer to one relayed call, without processes: RelayHub.dispatch."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc

from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.relay_hub import RelayHub
from serve.frontend.relay_wire import OK, RelayCall

METADATA = "/inference.GRPCInferenceService/ServerMetadata"


class _Servicer:
    """Every method answers ServerMetadata with a name of ``size`` characters."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __getattr__(self, method: str) -> Any:
        async def answer(request: Any, context: Any) -> Any:
            return pb.ServerMetadataResponse(name="x" * self.size)

        return answer


def _dispatch(tmp_path: Path, size: int, max_message: int) -> Any:
    servicer = _Servicer(size)
    hub = RelayHub(servicer, servicer, tmp_path, max_message)  # type: ignore[arg-type]
    call = RelayCall(id=7, method=METADATA, timeout_s=None, payload=b"")
    return asyncio.run(hub.dispatch(call))


def test_a_response_within_the_message_limit_goes_back_whole(tmp_path: Path) -> None:
    reply = _dispatch(tmp_path, size=100, max_message=1000)
    assert (reply.id, reply.code) == (7, OK)
    assert pb.ServerMetadataResponse.FromString(reply.payload).name == "x" * 100


def test_a_response_over_the_message_limit_fails_that_call_alone(tmp_path: Path) -> None:
    # framed whole, it would be over the relay's frame limit: the relay would drop its link to
    # the hub and with it every call in flight on that relay
    reply = _dispatch(tmp_path, size=5000, max_message=1000)
    assert (reply.id, reply.code) == (7, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    assert "over the server's 1000-byte message limit" in reply.details
    assert reply.payload == b""
