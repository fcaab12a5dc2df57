"""The command line's client for a running server's model-control RPCs."""

from __future__ import annotations

import grpc

from serve.errors import ServeError
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.pb import grpc_service_pb2_grpc as pb_grpc

CALL_TIMEOUT_S = 600.0  # a rollout waits for the new version to warm up and pass its probes


def _parameters(message: object, values: dict[str, str | bool]) -> None:
    for key, value in values.items():
        param = message.parameters[key]  # type: ignore[attr-defined]
        if isinstance(value, bool):
            param.bool_param = value
        else:
            param.string_param = value


def control(url: str, action: str, model: str, values: dict[str, str | bool]) -> None:
    """``action`` is "load" or "unload"; raises ServeError with the server's message."""
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if action == "load":
                request = pb.RepositoryModelLoadRequest(model_name=model)
                _parameters(request, values)
                stub.RepositoryModelLoad(request, timeout=CALL_TIMEOUT_S)
            else:
                request = pb.RepositoryModelUnloadRequest(model_name=model)
                _parameters(request, values)
                stub.RepositoryModelUnload(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise ServeError(f"{exc.code().name}: {exc.details()}") from None


def index(url: str) -> list[tuple[str, str, str, str]]:
    """(name, version, state, reason) of every model version the server has loaded."""
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            reply = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
        except grpc.RpcError as exc:
            raise ServeError(f"{exc.code().name}: {exc.details()}") from None
    return [(m.name, m.version, m.state, m.reason) for m in reply.models]
