"""GRPCInferenceService: a thin adapter from the Open Inference Protocol to the Runtime.

RPCs not implemented here fall through to the generated base class, which answers UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from serve.frontend import metadata
from serve.frontend.convert import infer_request_from_pb, infer_response_to_pb
from serve.frontend.gate import ReadinessGate
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.pb import grpc_service_pb2_grpc as pb_grpc
from serve.frontend.status import translate_errors
from serve.runtime import Runtime

Context: TypeAlias = grpc.aio.ServicerContext


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: Runtime, gate: ReadinessGate) -> None:
        self._runtime = runtime
        self._gate = gate

    @translate_errors
    async def ServerLive(self, request: Any, context: Context) -> Any:
        return pb.ServerLiveResponse(live=self._runtime.live)

    @translate_errors
    async def ServerReady(self, request: Any, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self._gate.open and self._runtime.ready)

    @translate_errors
    async def ModelReady(self, request: Any, context: Context) -> Any:
        service = self._runtime.service(request.name, request.version)
        return pb.ModelReadyResponse(ready=self._gate.open and service.ready)

    @translate_errors
    async def ServerMetadata(self, request: Any, context: Context) -> Any:
        return metadata.server_metadata()

    @translate_errors
    async def ModelMetadata(self, request: Any, context: Context) -> Any:
        return metadata.model_metadata(self._runtime.service(request.name, request.version).config)

    @translate_errors
    async def ModelConfig(self, request: Any, context: Context) -> Any:
        return metadata.model_config(self._runtime.service(request.name, request.version).config)

    @translate_errors
    async def ModelStatistics(self, request: Any, context: Context) -> Any:
        if request.name:
            services = [self._runtime.service(request.name, request.version)]
        else:
            services = self._runtime.services()
        return metadata.model_statistics(services)

    @translate_errors
    async def RepositoryIndex(self, request: Any, context: Context) -> Any:
        return metadata.repository_index(self._runtime.statuses(), request.ready)

    @translate_errors
    async def ModelInfer(self, request: Any, context: Context) -> Any:
        infer_request = infer_request_from_pb(request, context.time_remaining())
        return infer_response_to_pb(await self._runtime.infer(infer_request))
