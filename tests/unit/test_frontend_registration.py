"""The front end registers only its inference methods with gRPC's core (serve/frontend/server.py,
REGISTERED_METHODS) and still serves every method, registered or not, on a real grpc.aio server;
bytes that do not parse as the method's request are the caller's error (malformed.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.errors import InvalidInputError
from serve.frontend.malformed import MalformedRequest, tolerant
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.pb import grpc_service_pb2_grpc as pb_grpc
from serve.frontend.server import add_health_service, add_inference_service

SERVICE = "inference.GRPCInferenceService"
EVERY_METHOD = {m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}


class _Recorder:
    """A server that keeps what it was given."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, set[str]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered.setdefault(service, set()).update(handlers)


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method


def _generic_serves(recorder: _Recorder, method: str) -> bool:
    return any(h.service(_Details(method)) is not None for h in recorder.generic)


def test_only_the_inference_methods_are_registered_and_every_method_is_served():
    recorder = _Recorder()
    add_inference_service(pb_grpc.GRPCInferenceServiceServicer(), recorder)
    add_health_service(health_pb2_grpc.HealthServicer(), recorder)
    assert recorder.registered == {SERVICE: {"ModelInfer", "ModelStreamInfer"}}
    assert len(EVERY_METHOD) > 10  # the service's methods, from its descriptor
    for method in EVERY_METHOD:
        assert _generic_serves(recorder, f"/{SERVICE}/{method}"), method
    for method in ("Check", "Watch"):
        assert _generic_serves(recorder, f"/grpc.health.v1.Health/{method}"), method
    assert not _generic_serves(recorder, f"/{SERVICE}/NoSuchMethod")


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return pb.ModelInferResponse(model_name=request.model_name, id=request.id)


class _Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    async def Check(self, request: Any, context: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def test_registered_and_generic_methods_answer_on_a_real_server():
    async def main() -> tuple[Any, Any, Any, grpc.StatusCode]:
        server = grpc.aio.server()
        add_inference_service(_Servicer(), server)
        add_health_service(_Health(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                live = await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
                infer = await stub.ModelInfer(pb.ModelInferRequest(model_name="m", id="7"))
                health = health_pb2_grpc.HealthStub(channel)
                checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                try:  # served by the base servicer, through the generic path
                    await stub.ModelMetadata(pb.ModelMetadataRequest(name="m"), timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                return live, infer, checked, code
        finally:
            await server.stop(None)

    live, infer, checked, code = asyncio.run(main())
    assert live.live is True
    assert (infer.model_name, infer.id) == ("m", "7")
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    assert code == grpc.StatusCode.UNIMPLEMENTED


NOT_A_MESSAGE = b"\n\x08mlp"  # field 1 says 8 bytes follow; 3 do


def test_a_request_that_does_not_parse_becomes_a_malformed_request_that_refuses_to_be_read():
    parse = tolerant(pb.ModelInferRequest.FromString)
    good = pb.ModelInferRequest(model_name="m", id="7")
    assert parse(good.SerializeToString()) == good
    bad = parse(NOT_A_MESSAGE)
    assert isinstance(bad, MalformedRequest)
    with pytest.raises(InvalidInputError, match="malformed request message: Error parsing"):
        _ = bad.model_name


def test_bytes_that_do_not_parse_are_refused_invalid_argument_by_every_method_kind():
    """Registered (ModelInfer: the method meets the MalformedRequest), generic (ModelMetadata,
    health Check) and server-streaming (health Watch) methods; gRPC's own parser would answer
    UNKNOWN and log a traceback. Good requests are served as before."""

    async def main() -> dict[str, tuple[grpc.StatusCode, str]]:
        server = grpc.aio.server()
        add_inference_service(_DescribingServicer(), server)
        add_health_service(_WatchingHealth(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        got: dict[str, tuple[grpc.StatusCode, str]] = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for method in (
                    f"/{SERVICE}/ModelInfer",
                    f"/{SERVICE}/ModelMetadata",
                    "/grpc.health.v1.Health/Check",
                ):
                    try:
                        await channel.unary_unary(method)(NOT_A_MESSAGE, timeout=10)
                        got[method] = (grpc.StatusCode.OK, "")
                    except grpc.aio.AioRpcError as exc:
                        got[method] = (exc.code(), exc.details() or "")
                watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
                try:
                    async for _ in watch(NOT_A_MESSAGE, timeout=10):
                        pass
                    got["Watch"] = (grpc.StatusCode.OK, "")
                except grpc.aio.AioRpcError as exc:
                    got["Watch"] = (exc.code(), exc.details() or "")
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                infer = await stub.ModelInfer(pb.ModelInferRequest(model_name="m", id="7"))
                got["good"] = (grpc.StatusCode.OK, infer.id)
        finally:
            await server.stop(None)
        return got

    got = asyncio.run(main())
    assert got["good"] == (grpc.StatusCode.OK, "7")
    # the test servicer's ModelInfer reads the request: InvalidInputError, which the real
    # servicer translates (tests/integration/test_errors.py); here nothing does
    assert got[f"/{SERVICE}/ModelInfer"][0] == grpc.StatusCode.UNKNOWN
    assert "InvalidInputError" in got[f"/{SERVICE}/ModelInfer"][1]
    for method in (f"/{SERVICE}/ModelMetadata", "/grpc.health.v1.Health/Check", "Watch"):
        code, details = got[method]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, method
        assert details.startswith("malformed request message: Error parsing message"), details


class _DescribingServicer(_Servicer):
    """Its ModelMetadata a coroutine, as every method of the real servicer is (the generated
    base's plain functions are left as they are)."""

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return pb.ModelMetadataResponse(name=request.name)


class _WatchingHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    async def Check(self, request: Any, context: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request: Any, context: Any) -> None:
        await context.write(health_pb2.HealthCheckResponse(status=1))
