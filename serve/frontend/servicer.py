"""GRPCInferenceService: a thin adapter from the Open Inference Protocol to the Runtime.

RPCs not served answer UNIMPLEMENTED saying what is not supported (unserved.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn, TypeAlias, cast

import grpc

from serve.control import ModelControl
from serve.errors import (
    AnswerTooLargeError,
    DeadlineExceededError,
    InflightLimitError,
    InvalidInputError,
    ServeError,
)
from serve.frontend import metadata
from serve.frontend.admission import (
    ANSWER_COPIES,
    InflightBudget,
    Source,
    answer_bytes,
    held_bytes,
    release_once_sent,
)
from serve.frontend.convert import (
    TIMEOUT,
    PlainCodec,
    infer_request_from_pb,
    infer_response_to_pb,
    repository_parameters,
)
from serve.frontend.gate import ReadinessGate
from serve.frontend.malformed import MalformedRequest
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.pb import grpc_service_pb2_grpc as pb_grpc
from serve.frontend.status import abort_with, translate_errors
from serve.frontend.streams import serve_stream
from serve.frontend.unserved import UnservedRpcs
from serve.model_service import ModelService
from serve.protocol import InferResponse
from serve.runtime import Runtime

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # as ServerConfig.max_message_bytes
ANSWER_HEADROOM = 64 * 1024  # more than an answer's names, shapes and parameters take


# A call that gRPC (or a relay) ends this close to its deadline ended because of it: the
# transport's clock and ours reach the deadline a little apart.
DEADLINE_SLACK_S = 0.01

# Set (true) on every answer on a stream, as Triton sets it: a request's last response (each
# request here has one). Clients written for decoupled models read the stream until they see it.
FINAL_RESPONSE = "triton_final_response"

LOAD_PARAMETERS = ("version", "rollback")
UNLOAD_PARAMETERS = ("version", "unload_dependents")  # (the last: tritonclient always sends it)


def _control_parameters(params: Any, known: Sequence[str]) -> dict[str, Any]:
    """A load or unload request's parameters; InvalidInputError for any this server does not
    act on (a silently ignored 'config' would load something other than what was asked)."""
    values = repository_parameters(params)
    if "config" in values or any(key.startswith("file:") for key in values):
        raise InvalidInputError(
            "loading a model from a configuration or files sent with the request ('config', "
            "'file:...') is not supported: warmserve loads immutable bundles from its "
            "repository; put the bundle there and load it by name (and 'version')"
        )
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InvalidInputError(
            f"unknown parameters {unknown}; this call takes {', '.join(map(repr, known))}"
        )
    return values


def _flag(params: dict[str, Any], key: str) -> bool:
    """A boolean parameter, sent as a bool or as the string 'true' / 'false'."""
    value = params.get(key, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise InvalidInputError(f"parameter {key!r} must be true or false, not {value!r}")
    return value


def _request_id(request: Any) -> str:
    """A request's id, to name it in its error; "" for one whose message did not parse."""
    return "" if isinstance(request, MalformedRequest) else str(request.id)


class _RequestFailed(Exception):
    """One request of a stream failed: its message goes back as that request's answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _StreamCall:
    """What ModelInfer needs of its context, for one request of a stream: the stream's time
    left, and an abort that fails that request alone."""

    def __init__(self, stream: Context) -> None:
        self._stream = stream
        self.answer_held = 0  # the budget its answer holds until the stream has sent it

    def time_remaining(self) -> float | None:
        remaining: float | None = self._stream.time_remaining()
        return remaining

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise _RequestFailed(details)  # (a stream error carries a message, no status code)


class InferenceServicer(UnservedRpcs, pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        runtime: Runtime,
        gate: ReadinessGate,
        control: ModelControl,
        budget: InflightBudget,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._runtime = runtime
        self._gate = gate
        self._control = control
        self._budget = budget  # request bytes in flight, server-wide (every ModelInfer)
        self._max_message_bytes = max_message_bytes  # the largest answer gRPC may send
        # answer_bytes beyond which an answer may be too large (its message's own fields are
        # small beside its data): only then is the message measured
        self._answer_limit = ANSWER_COPIES * (max_message_bytes - ANSWER_HEADROOM)
        # set when the server stops: open streams are answered and closed (close_streams)
        self._streams_closing = asyncio.Event()

    @translate_errors
    async def ServerLive(self, request: Any, context: Context) -> Any:
        return pb.ServerLiveResponse(live=self._runtime.live)

    @translate_errors
    async def ServerReady(self, request: Any, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self._gate.open and self._runtime.ready)

    @translate_errors
    async def ModelReady(self, request: Any, context: Context) -> Any:
        # Triton's contract, which its clients and KServe tooling rely on: a model (or version)
        # that is not loaded, was unloaded or never existed is not ready (ready=false), not an
        # error. Inference and metadata calls for it answer NOT_FOUND with the reason.
        ready = self._runtime.model_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=self._gate.open and ready)

    @translate_errors
    async def ServerMetadata(self, request: Any, context: Context) -> Any:
        return metadata.server_metadata()

    @translate_errors
    async def ModelMetadata(self, request: Any, context: Context) -> Any:
        service = self._runtime.service(request.name, request.version)
        versions = [s.config.version for s in self._runtime.versions(request.name)]
        return metadata.model_metadata(service.config, versions)

    @translate_errors
    async def ModelConfig(self, request: Any, context: Context) -> Any:
        service = self._runtime.service(request.name, request.version)
        return metadata.model_config(service.config, service.device)

    @translate_errors
    async def ModelStatistics(self, request: Any, context: Context) -> Any:
        if request.name and request.version:
            services = [self._runtime.service(request.name, request.version)]
        elif request.name:
            services = self._runtime.versions(request.name)
        else:
            services = self._runtime.services()
        return metadata.model_statistics(services)

    @translate_errors
    async def RepositoryIndex(self, request: Any, context: Context) -> Any:
        return metadata.repository_index(self._runtime.statuses(), request.ready)

    @translate_errors
    async def RepositoryModelLoad(self, request: Any, context: Context) -> Any:
        params = _control_parameters(request.parameters, LOAD_PARAMETERS)
        if _flag(params, "rollback"):
            await self._control.rollback(request.model_name)
        else:
            await self._control.load(request.model_name, params.get("version", ""))
        return pb.RepositoryModelLoadResponse()

    @translate_errors
    async def RepositoryModelUnload(self, request: Any, context: Context) -> Any:
        params = _control_parameters(request.parameters, UNLOAD_PARAMETERS)
        await self._control.unload(request.model_name, params.get("version", ""))
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(
        self, request: Any, context: Context, raw_inputs: Sequence[bytes | memoryview] | None = None
    ) -> Any:
        """``raw_inputs``: the raw input contents, when a relay passed them apart from the
        request (its ring; relay_wire.RelayRing)."""
        # The hot path: errors are translated inline rather than by the decorator (one coroutine
        # frame less per call), and the common request skips the general types (PlainCodec).
        started = time.perf_counter_ns()
        service = None
        held = 0  # bytes of the in-flight budget this request holds, once admitted
        try:
            service = self._runtime.service(request.model_name, request.model_version)
            codec = service.codec
            if codec is None:
                codec = service.codec = PlainCodec(service.config, service.parameters)
            raw = request.raw_input_contents if raw_inputs is None else raw_inputs
            plain = codec.decode(request, raw) if raw else None
            if plain is None:
                return await self._infer(service, request, context, raw_inputs, started)
            arrival = time.monotonic_ns()
            inputs, rows = plain
            source = Source.RAW if raw_inputs is None else Source.RING
            held = self._admit(service, inputs, source, arrival, rows * codec.answer_row_bytes)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            decoded = time.perf_counter_ns()
            try:
                outputs = await service.submit(inputs, rows, deadline)
            except ServeError as exc:
                service.request_failed(arrival, rows, exc)
                raise
            except asyncio.CancelledError:
                inputs.clear()  # queued still: its arrays go now, with its budget (submit)
                raise
            answered = time.perf_counter_ns()
            message = codec.encode(request, outputs)
            try:
                size = self._answer_size(outputs, message)
            except ServeError as exc:
                service.request_failed(arrival, rows, exc)
                raise
            codec.learn_answer(rows, size)
            service.request_ok(arrival, rows)
            service.stats.codec_done(decoded - started, time.perf_counter_ns() - answered)
            self._hold_answer(context, size)
            return message
        except asyncio.CancelledError:  # the call ended: its queued request is dropped
            if service is not None:  # (not counted yet: the only awaits are before the answer)
                self._abandoned(service, request, context, started)
            raise
        except Exception as exc:
            await abort_with(context, exc)
        finally:
            self._budget.release(held)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[Any]:
        """Each request on the stream is answered as ModelInfer would answer it, concurrently
        and in the order the answers complete: a response, or an error_message for that request
        alone (the stream goes on), each marked as the request's final response. The stream's
        deadline applies to each of its requests."""

        async def answer(request: Any) -> tuple[Any, int]:
            call = _StreamCall(context)
            try:
                response = await self.ModelInfer(request, cast(Context, call))
            except _RequestFailed as failed:  # with the request's id, to say which one failed
                response = pb.ModelInferResponse(id=_request_id(request))
                response.parameters[FINAL_RESPONSE].bool_param = True
                message = pb.ModelStreamInferResponse(
                    error_message=failed.message, infer_response=response
                )
                return message, 0
            response.parameters[FINAL_RESPONSE].bool_param = True
            return pb.ModelStreamInferResponse(infer_response=response), call.answer_held

        closing = self._streams_closing
        async for message in serve_stream(request_iterator, answer, self._budget, closing, context):
            yield message

    def close_streams(self) -> None:
        """The server is stopping: every open ModelStreamInfer stream reads no further
        request, answers those it has read, and ends UNAVAILABLE (StreamClosed), so its caller
        resends the rest on a new stream, which gRPC's stop sends to another server. Otherwise
        such a stream would hold the stop for the whole grace period and then be cancelled
        with its requests in flight."""
        self._streams_closing.set()

    async def _infer(
        self,
        service: ModelService,
        request: Any,
        context: Context,
        raw_inputs: Sequence[bytes | memoryview] | None,
        started: int,
    ) -> Any:
        """Any other request: the general types, and the errors the checks give."""
        arrival = time.monotonic_ns()
        try:
            infer_request = infer_request_from_pb(request, context.time_remaining(), raw_inputs)
        except ServeError as exc:  # malformed: counted as the signature check's refusals are
            service.request_failed(arrival, 0, exc)
            raise
        if raw_inputs is not None:
            source = Source.RING
        else:
            source = Source.RAW if request.raw_input_contents else Source.TYPED
        arrays = [t.data for t in infer_request.inputs]
        rows = 1  # (a malformed request is refused once admitted, by the model's checks)
        if arrays and arrays[0].ndim and service.config.max_batch_size > 0:
            rows = arrays[0].shape[0]
        answer = rows * service.codec.answer_row_bytes
        held = self._admit(service, arrays, source, arrival, answer)
        try:
            decoded = time.perf_counter_ns()
            sized: list[tuple[Any, int]] = []  # the message and its answer_bytes, once checked

            def check(response: InferResponse) -> None:
                message = infer_response_to_pb(response)
                arrays = [t.data for t in response.outputs]
                sized.append((message, self._answer_size(arrays, message)))

            try:
                await service.infer(infer_request, check)
            except DeadlineExceededError as exc:
                timeout_us = infer_request.parameters.get(TIMEOUT)
                if not (timeout_us and infer_request.timed):
                    raise
                raise DeadlineExceededError(
                    f"{exc}: its {TIMEOUT!r} parameter ({timeout_us} µs) passed"
                ) from None
            answered = time.perf_counter_ns()
            ((message, size),) = sized
            service.codec.learn_answer(rows, size)
            service.stats.codec_done(decoded - started, time.perf_counter_ns() - answered)
            self._hold_answer(context, size)
            return message
        finally:
            self._budget.release(held)

    def _answer_size(self, outputs: Sequence[Any], message: Any) -> int:
        """What the answer (``outputs``: its arrays) holds until sent (admission.answer_bytes).
        AnswerTooLargeError when it is larger than the server may send: gRPC would fail the
        call RESOURCE_EXHAUSTED after the handler, logging an ERROR with a traceback, and it
        would count as answered."""
        size = answer_bytes(outputs)
        if size > self._answer_limit and (exact := message.ByteSize()) > self._max_message_bytes:
            raise AnswerTooLargeError(
                f"the answer is {exact} bytes, more than the server sends in one "
                f"message ({self._max_message_bytes} bytes, max_message_bytes): ask for fewer "
                "rows per request"
            )
        return size

    def _hold_answer(self, context: Context, size: int) -> None:
        """Count the answer (``size`` bytes) in the in-flight budget until gRPC has sent it
        (admission.py): a client that does not read its answers makes gRPC keep them. A
        stream's requests and relayed calls have contexts without ``add_done_callback``: a stream
        releases its answers as it sends them (streams.answer_concurrently), a relay holds them
        in its own budget."""
        if hasattr(context, "add_done_callback"):  # a gRPC call's own context
            release_once_sent(self._budget, self._budget.hold(size))
        elif isinstance(context, _StreamCall):  # released once the stream has sent it
            context.answer_held = self._budget.hold(size)

    def _admit(
        self,
        service: ModelService,
        inputs: Sequence[Any],
        source: Source,
        arrival: int,
        answer: int,
    ) -> int:
        """Admit a decoded request to the in-flight budget: the bytes it holds and ``answer``,
        what its answer is expected to hold (0: not known ahead), to release when it ends.
        Refused (InflightLimitError, RESOURCE_EXHAUSTED), it is counted as failed."""
        try:
            return self._budget.admit(held_bytes(inputs, source) + answer)
        except InflightLimitError as exc:
            service.request_failed(arrival, 0, exc)
            raise

    @staticmethod
    def _abandoned(service: ModelService, request: Any, context: Context, started: int) -> None:
        """Count a call that ended before its answer: at its deadline, or cancelled."""
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_S
        service.request_abandoned(time.perf_counter_ns() - started, expired)
        log.debug(
            "ModelInfer %r: %s",
            request.model_name,
            "its deadline passed" if expired else "cancelled by its caller",
        )
