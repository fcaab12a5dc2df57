"""The grpc.aio server: build, bind, start, and stop gracefully."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from serve.config import ServerConfig
from serve.control import ModelControl
from serve.errors import ConfigError
from serve.frontend import listener
from serve.frontend.admission import InflightBudget
from serve.frontend.convert import loopback_request
from serve.frontend.gate import ReadinessGate
from serve.frontend.health import HealthService
from serve.frontend.malformed import tolerant_handler
from serve.frontend.pb import grpc_service_pb2_grpc as pb_grpc
from serve.frontend.servicer import InferenceServicer
from serve.runtime import Runtime

log = logging.getLogger(__name__)

LOOPBACK_CALLS = 32  # per model, before readiness opens
LOOPBACK_TIMEOUT_S = 30.0

# The methods gRPC's core matches itself ("registered methods"); every method, these included,
# is also served through the generic handlers. grpc.aio's server keeps one task waiting per
# registered method, plus one for the generic path, and for every call it waits on all of them
# (asyncio.wait, FIRST_COMPLETED: a callback added to and removed from each, twice a call).
# With every method of the service and of health registered that was 23 tasks: about 230 of the
# ~420 Python calls the serving process made per request. Registering the two inference methods
# alone leaves 3, and the others are found by a dictionary lookup.
REGISTERED_METHODS = {
    "inference.GRPCInferenceService": frozenset({"ModelInfer", "ModelStreamInfer"}),
}


class _HotMethodsOnly:
    """``server`` as the generated ``add_*_to_server`` functions see it: their generic handlers
    go through whole, their registered methods only where REGISTERED_METHODS names them; every
    method's request parser is made tolerant of bytes that do not parse (malformed.py)."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(_TolerantMethods(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        hot = REGISTERED_METHODS.get(service, frozenset())
        kept = {
            name: tolerant_handler(handler, refuse=False)  # (they meet a MalformedRequest)
            for name, handler in handlers.items()
            if name in hot
        }
        if kept:
            self._server.add_registered_method_handlers(service, kept)


class _TolerantMethods(grpc.GenericRpcHandler):
    """A generic handler's methods, each with a tolerant parser, answering a request that does
    not parse INVALID_ARGUMENT before it runs (made once per method)."""

    def __init__(self, handler: Any) -> None:
        self._handler = handler
        self._made: dict[str, Any] = {}

    def service(self, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        made = self._made.get(method)
        if made is None:
            handler = self._handler.service(handler_call_details)
            if handler is None:  # not one of its methods
                return None
            made = self._made[method] = tolerant_handler(handler, refuse=True)
        return made


def add_inference_service(servicer: Any, server: Any) -> None:
    """The Open Inference Protocol's service on ``server``, its hot methods registered (above)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _HotMethodsOnly(server))


def add_health_service(health: Any, server: Any) -> None:
    """grpc.health.v1 on ``server``, through the generic handlers only (probes are rare)."""
    health_pb2_grpc.add_HealthServicer_to_server(health, _HotMethodsOnly(server))


class GrpcFrontend:
    def __init__(self, config: ServerConfig, runtime: Runtime, control: ModelControl) -> None:
        self._config = config
        self._runtime = runtime
        self.gate = ReadinessGate()
        self.budget = InflightBudget(config.max_inflight_bytes)
        self.servicer = InferenceServicer(
            runtime, self.gate, control, self.budget, config.max_message_bytes
        )
        self.health = HealthService(runtime, self.gate)
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, private: bool = False) -> None:
        """Listen on the configured address; ``private``: on a loopback port of the system's
        choosing instead (relay processes serve the configured one)."""
        limit = self._config.max_message_bytes
        age = 0.0 if private else self._config.max_connection_age_s
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),  # two servers must never silently share a port
                # (relayed, the relays serve the public port and send its GOAWAYs)
                *listener.connection_age_options(age),
            ]
        )
        add_inference_service(self.servicer, server)
        add_health_service(self.health, server)
        host = "127.0.0.1" if private else self._config.host
        self.port = _bind(server, _address(host, 0 if private else self._config.grpc_port))
        await server.start()
        self._server = server
        if self._config.health_port >= 0:
            await self._start_health_server()
        log.info(
            "gRPC listening on %s:%d (max message %d bytes; requests in flight up to %d bytes)",
            host,
            self.port,
            limit,
            self.budget.limit,
        )
        if self.budget.limit < limit:
            log.warning(
                "max_inflight_bytes (%d) is below max_message_bytes (%d): requests that large "
                "will be refused (RESOURCE_EXHAUSTED) however idle the server is",
                self.budget.limit,
                limit,
            )

    async def _start_health_server(self) -> None:
        """Health alone on its own plaintext port (probes keep working if the main port has TLS)."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_health_service(self.health, server)
        port = _bind(server, _address(self._config.host, self._config.health_port))
        await server.start()
        self._health_server = server
        log.info("gRPC health listening on %s:%d", self._config.host, port)

    async def open_gate(self, relay_port: int | None = None) -> None:
        """Warm this front end's own path with loopback ModelInfer calls per ready model (protobuf
        conversion, the handler, the batch path), then let readiness through. A few dozen calls,
        not one: the interpreter specialises a code path only after it has run several times,
        and the first request after readiness should find it so. With relays, the calls go
        through the relayed port, the path live calls take."""
        port = self.port if relay_port is None else relay_port
        async with grpc.aio.insecure_channel(f"{_loopback(self._config.host)}:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for service in self._runtime.services():
                if not service.ready:
                    continue
                inputs = service.controller.prober.inputs
                request = loopback_request(service.config, inputs)
                try:
                    for _ in range(LOOPBACK_CALLS):
                        await stub.ModelInfer(request, timeout=LOOPBACK_TIMEOUT_S)
                except grpc.RpcError as exc:
                    log.warning("loopback warm-up of %s failed: %s", service.config.name, exc)
                service.forget_warm_up()
        self.gate.set(True)

    def begin_drain(self) -> None:
        """Readiness answers NOT_SERVING from now on; calls are still taken until stop()."""
        self.gate.set(False)

    async def drain_connections(self, limit_s: float) -> bool:
        """Stop listening on the gRPC port, then wait (at most ``limit_s``) until no client is
        busy on it: each connection gets its GOAWAY at its age (max_connection_age_s) and its
        client takes its next calls elsewhere, so the stop that follows cancels none of them
        (gRPC cancels the calls that reach it in the instant it stops, grpc/grpc#41785). Calls
        are served meanwhile. Whether no client was busy any more."""
        if self._server is None:
            return True
        return await listener.drain("the gRPC port", self.port, limit_s, quiet=True)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls now; in-flight calls get ``grace_s`` to finish, then are cancelled.
        Open streams are answered and closed at once (InferenceServicer.close_streams), and
        health Watch streams end (HealthService.close_watches): neither holds the grace."""
        self.begin_drain()
        if self._server is not None:
            self.servicer.close_streams()
            self.health.close_watches()
            await self._server.stop(grace_s)
            self._server = None
        if self._health_server is not None:
            await self._health_server.stop(0)
            self._health_server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _loopback(host: str) -> str:
    """How this process reaches its own port bound on ``host``."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _address(host: str, port: int) -> str:
    """``host:port`` as gRPC takes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(server: grpc.aio.Server, address: str) -> int:
    try:
        return int(server.add_insecure_port(address))
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc}") from None
