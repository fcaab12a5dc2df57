"""grpc.health.v1.Health for Kubernetes' native gRPC probes, fed by the runtime's readiness.

Service names: ``""`` and ``"readiness"`` are the whole server (every model has its warm
minimum passing probes); ``"liveness"`` is answered by the event loop alone and never touches a
worker or the GPU; each model's name is that model's readiness. ``Watch`` streams every change
to every watcher (the reference servicer in grpcio-health-checking drops other watchers of a
service when one disconnects, so this one keeps a queue per watcher). When the server stops,
each Watch, having streamed NOT_SERVING, ends (close_watches): a watcher (a client balancer's
health check, a mesh) would otherwise hold the stop for its whole grace period.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.config import LIVENESS_SERVICE, READINESS_SERVICE
from serve.frontend.gate import ReadinessGate
from serve.runtime import Runtime

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
CLOSED = -1  # not a status: the server is stopping, the Watch ends


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, runtime: Runtime, gate: ReadinessGate) -> None:
        self._runtime = runtime
        self._gate = gate
        self._status: dict[str, int] = {}
        self._watchers: dict[str, set[asyncio.Queue[int]]] = {}
        self._closed = False
        runtime.add_listener(self.refresh)
        gate.add_listener(self.refresh)
        self.refresh()

    def statuses(self) -> dict[str, int]:
        """What every service should answer now."""
        ready = self._gate.open and self._runtime.ready
        statuses = {
            "": SERVING if ready else NOT_SERVING,
            READINESS_SERVICE: SERVING if ready else NOT_SERVING,
            LIVENESS_SERVICE: SERVING,
        }
        for name in self._runtime.model_names():
            model_ready = self._gate.open and self._runtime.model_ready(name)
            statuses[name] = SERVING if model_ready else NOT_SERVING
        return statuses

    def refresh(self) -> None:
        current = self.statuses()
        for service in [s for s in self._status if s not in current]:  # a model unloaded
            del self._status[service]
            log.info("health %r: unknown now (its model was unloaded)", service)
            for queue in self._watchers.get(service, ()):
                queue.put_nowait(SERVICE_UNKNOWN)
        for service, status in current.items():
            if self._status.get(service) != status:
                if service in self._status or status != SERVING:
                    log.info(
                        "health %r: %s",
                        service,
                        health_pb2.HealthCheckResponse.ServingStatus.Name(status),
                    )
                self._status[service] = status
                for queue in self._watchers.get(service, ()):
                    queue.put_nowait(status)

    def close_watches(self) -> None:
        """The server is stopping: every Watch ends (OK) once it has sent what it has queued
        (NOT_SERVING, since the stop closed the readiness gate first); a Watch that starts
        from now on sends its status and ends at once."""
        self._closed = True
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(CLOSED)

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        watchers = self._watchers.setdefault(request.service, set())
        watchers.add(queue)
        try:
            last = self._status.get(request.service, SERVICE_UNKNOWN)
            await context.write(health_pb2.HealthCheckResponse(status=last))
            while not self._closed:
                status = await queue.get()
                if status == CLOSED:
                    break
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
        finally:
            watchers.discard(queue)
            if not watchers:
                self._watchers.pop(request.service, None)
