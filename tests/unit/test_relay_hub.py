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


def test_the_hub_pings_a_relay_which_answers_from_its_loop_and_silence_is_measured(
    tmp_path: Path,
) -> None:
    from serve.frontend.relay import HubLink

    async def until(predicate: Any, what: str) -> None:
        async with asyncio.timeout(10):
            while not predicate():
                await asyncio.sleep(0.001)  # (polling the loop, bounded: not a wait for a time)

    async def main() -> list[float | None]:
        servicer = _Servicer(1)
        hub = RelayHub(servicer, servicer, tmp_path, 1 << 20)  # type: ignore[arg-type]
        await hub.start()
        link = HubLink(str(hub.path), relay=3, max_frame=1 << 20)
        seen: list[float | None] = [hub.ping(3)]  # not connected yet
        try:
            await link.connect()
            await until(lambda: hub.ping(3) is not None, "the relay's Hello")
            (connection,) = hub._connections
            # The relay answers each ping: a ping's silence, once the answer is in, is 0 again.
            await until(lambda: connection._unanswered_since is None, "the relay's Pong")
            seen.append(hub.ping(3))
            await until(lambda: connection._unanswered_since is None, "the next Pong")
            # A relay that reads nothing answers nothing: its silence grows from the first ping.
            link._transport.pause_reading()  # type: ignore[union-attr]
            first = hub.ping(3)
            await until(lambda: (hub.ping(3) or 0.0) > 0.05, "the silence to grow")
            seen += [first, hub.ping(3)]
            link._transport.resume_reading()  # type: ignore[union-attr]
            await until(lambda: connection._unanswered_since is None, "the late Pongs")
            seen.append(hub.ping(3))
        finally:
            await link.close()
            await hub.stop()
        return seen

    before, answered, first, silent, after = asyncio.run(main())
    assert before is None  # no relay 3 yet
    assert answered == 0.0 and first == 0.0
    assert silent is not None and silent > 0.05
    assert after == 0.0
