"""The in-flight request budget: its accounting, and ModelInfer admitting and releasing through
it on every path (direct, stream, relayed), with a stand-in model service (no processes)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import msgspec
import numpy as np
import pytest

from serve.config import ModelConfig, TensorSpec
from serve.errors import (
    DeadlineExceededError,
    InflightLimitError,
    ModelExecutionError,
    ServeError,
)
from serve.frontend.admission import (
    ANSWER_COPIES,
    BYTES_ELEMENT_OVERHEAD,
    RAW_STRING_OVERHEAD,
    InflightBudget,
    Source,
    answer_bytes,
    expected_answer_bytes,
    held_bytes,
)
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.relay_hub import RelayHub
from serve.frontend.relay_wire import MODEL_INFER, OK, RelayCall
from serve.frontend.servicer import InferenceServicer
from serve.protocol import Datatype, InferResponse, Tensor
from serve.protocol.datatypes import bytes_tensor_to_raw
from serve.telemetry.metrics import outcome
from serve.telemetry.stats import ModelStats
from tests.unit.grpc_call import GrpcCallTask

ROW_BYTES = 4 * 4  # one row of the model's FP32 [4] input
MODEL = ModelConfig(
    name="m",
    backend="onnx",
    model_file="m.onnx",
    inputs=(TensorSpec("IN", "FP32", (4,)),),
    outputs=(TensorSpec("OUT", "FP32", (4,)),),
    max_batch_size=8,
)

# The same model with an output of variable size: its answers are not reserved ahead (the
# model above reserves ANSWER_COPIES × 16 bytes a row when a request is admitted).
VARIABLE = msgspec.structs.replace(MODEL, outputs=(TensorSpec("OUT", "FP32", (-1,)),))

# --- the budget and the size estimate -----------------------------------------------------------


def test_the_budget_admits_up_to_its_limit_refuses_beyond_and_admits_again_after_a_release():
    budget = InflightBudget(100)
    assert budget.admit(60) == 60
    assert budget.admit(40) == 40
    with pytest.raises(InflightLimitError) as refused:
        budget.admit(1)
    message = str(refused.value)
    assert "holds 100 bytes of requests and unsent answers in flight (limit 100" in message
    assert "retry" in str(refused.value) and "replicas" in str(refused.value)
    assert budget.held == 100, "a refused request holds nothing"
    budget.release(60)
    assert budget.admit(50) == 50 and budget.held == 90
    assert budget.refused == 1


def test_a_request_larger_than_the_whole_budget_is_refused_as_never_admissible():
    budget = InflightBudget(100)
    with pytest.raises(InflightLimitError) as refused:
        budget.admit(101)
    assert "more than the server's whole budget" in str(refused.value)
    assert "can never be admitted" in str(refused.value)
    assert budget.held == 0


def test_a_refusal_is_resource_exhausted_and_counted_apart_from_a_full_queue():
    from serve.frontend.status import status_for

    code, _ = status_for(InflightLimitError("full"))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert outcome(InflightLimitError("full")) == "inflight_bytes_full"


def test_raw_inputs_count_twice_their_size_and_once_from_a_relay_ring():
    array = np.zeros((2, 4), np.float32)
    assert held_bytes([array], Source.RAW) == 2 * array.nbytes
    assert held_bytes([array], Source.RING) == array.nbytes


def test_typed_contents_count_the_message_field_and_the_array():
    assert held_bytes([np.zeros(10, np.float32)], Source.TYPED) == 10 * (4 + 4)
    assert held_bytes([np.zeros(10, np.int8)], Source.TYPED) == 10 * (1 + 4)  # int_contents
    assert held_bytes([np.zeros(10, np.bool_)], Source.TYPED) == 10 * (1 + 1)


def test_bytes_elements_count_their_objects_overhead_several_times_their_wire_size():
    elements = np.empty(1000, dtype=np.object_)
    elements[:] = [b"0123456789"] * 1000
    wire = len(bytes_tensor_to_raw(elements))  # 14 bytes an element
    held = held_bytes([elements], Source.RAW)
    assert held == 2 * 10_000 + 1000 * (BYTES_ELEMENT_OVERHEAD + 4)
    assert held > 4 * wire


# --- ModelInfer through the budget --------------------------------------------------------------


class _Service:
    """One model version whose requests wait on futures the test resolves."""

    def __init__(self, model: ModelConfig) -> None:
        self.config = model
        self.parameters: dict[str, Any] = {}
        self.codec: Any = None
        self.stats = ModelStats()
        self.waiting: list[asyncio.Future[list[Any]]] = []
        self.arrived = asyncio.Event()
        self.failed: list[Exception] = []
        self.abandoned = 0

    def submit(self, inputs: list[Any], rows: int, deadline: float | None) -> Any:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.arrived.set()
        return future

    async def infer(self, request: Any, check_answer: Any = None) -> InferResponse:
        (out,) = await self.submit([t.data for t in request.inputs], 1, None)  # the general path
        response = InferResponse("m", "1", [Tensor("OUT", Datatype.FP32, out)], request.id)
        if check_answer is not None:
            try:
                check_answer(response)
            except ServeError as exc:
                self.failed.append(exc)
                raise
        return response

    def request_ok(self, arrival: int, rows: int) -> None:
        pass

    def request_failed(self, arrival: int, rows: int, exc: Exception) -> None:
        self.failed.append(exc)

    def request_abandoned(self, elapsed_ns: int, expired: bool) -> None:
        self.abandoned += 1

    async def next_arrival(self) -> asyncio.Future[list[Any]]:
        async with asyncio.timeout(10):
            await self.arrived.wait()
        self.arrived.clear()
        return self.waiting[-1]


class _Runtime:
    def __init__(self, service: _Service) -> None:
        self._service = service

    def service(self, name: str, version: str = "") -> _Service:
        return self._service


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Context:
    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Aborted(code, details)


def _servicer(
    limit: int, model: ModelConfig = VARIABLE
) -> tuple[InferenceServicer, _Service, InflightBudget]:
    service = _Service(model)
    budget = InflightBudget(limit)
    servicer = InferenceServicer(_Runtime(service), None, None, budget)  # type: ignore[arg-type]
    return servicer, service, budget


def _raw_request(rows: int) -> Any:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="IN", datatype="FP32", shape=[rows, 4])
    request.raw_input_contents.append(np.ones((rows, 4), np.float32).tobytes())
    return request


def _typed_request(rows: int) -> Any:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="IN", datatype="FP32", shape=[rows, 4])
    tensor.contents.fp32_contents.extend([1.0] * rows * 4)
    return request


def _answer(future: asyncio.Future[list[Any]], rows: int) -> None:
    future.set_result([np.zeros((rows, 4), np.float32)])


@pytest.mark.parametrize("make", [_raw_request, _typed_request], ids=["raw", "typed"])
def test_a_request_holds_its_bytes_while_in_flight_and_releases_them_when_answered(make):
    async def main() -> tuple[int, int, Any]:
        servicer, service, budget = _servicer(1 << 20)
        call = asyncio.ensure_future(servicer.ModelInfer(make(2), _Context()))
        future = await service.next_arrival()
        held = budget.held
        _answer(future, 2)
        response = await call
        return held, budget.held, response

    held, after, response = asyncio.run(main())
    assert held >= 2 * 2 * ROW_BYTES
    assert after == 0
    assert list(response.outputs[0].shape) == [2, 4]


class _GrpcContext(_Context, GrpcCallTask):
    """A gRPC call's own context (not a stream's request's, nor a relayed call's), whose handler
    runs in the call's task (GrpcCallTask: ``start``, ``sent``)."""

    def __init__(self) -> None:
        GrpcCallTask.__init__(self)

    def add_done_callback(self, callback: Any) -> None:
        # grpc.aio keeps these bound to the context after they ran: a reference cycle per call
        raise AssertionError("the answer's budget is released by the call's task, not this")


@pytest.mark.parametrize("make", [_raw_request, _typed_request], ids=["raw", "typed"])
def test_an_answer_holds_the_budget_until_grpc_has_sent_it(make):
    async def main() -> None:
        answer = ANSWER_COPIES * 2 * ROW_BYTES  # 2 rows
        # (the model's answers vary in size: once one is made, a request reserves one like it)
        servicer, service, budget = _servicer(2 * answer + 2 * 2 * ROW_BYTES - 1)
        context = _GrpcContext()
        call = context.start(servicer.ModelInfer(make(2), context))
        _answer(await service.next_arrival(), 2)
        await call
        assert budget.held == answer, "the answer's bytes, until it is sent"
        # the unsent answer leaves no room for another request of 2 rows (it holds 4 rows) and
        # the answer it reserves
        second = asyncio.ensure_future(servicer.ModelInfer(make(2), _Context()))
        with pytest.raises(_Aborted) as refused:
            await second
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "unsent answers" in refused.value.details
        await context.sent()
        assert budget.held == 0

    asyncio.run(main())


@pytest.mark.parametrize("make", [_raw_request, _typed_request], ids=["raw", "typed"])
def test_a_request_reserves_its_answer_when_the_model_config_fixes_its_size(make):
    # a burst of requests admitted before any answer exists would otherwise pass the budget
    # once answered, by every answer nobody reads
    async def main() -> None:
        answer = ANSWER_COPIES * 2 * ROW_BYTES  # 2 rows of OUT FP32 [4]
        assert expected_answer_bytes(MODEL) == ANSWER_COPIES * ROW_BYTES
        servicer, service, budget = _servicer(2 * 2 * ROW_BYTES + answer, MODEL)
        context = _GrpcContext()
        call = context.start(servicer.ModelInfer(make(2), context))
        queued = await service.next_arrival()
        assert budget.held == 2 * 2 * ROW_BYTES + answer, "the request and its answer to be"
        with pytest.raises(_Aborted) as refused:  # the answer to be leaves no room for a row
            await servicer.ModelInfer(make(1), _Context())
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        _answer(queued, 2)
        await call
        assert budget.held == answer, "the answer, made, until it is sent"
        await context.sent()
        assert budget.held == 0

    asyncio.run(main())


@pytest.mark.parametrize("make", [_raw_request, _typed_request], ids=["raw", "typed"])
def test_an_answer_larger_than_the_server_may_send_fails_its_request_only(make):
    async def main() -> None:
        service = _Service(MODEL)
        budget = InflightBudget(1 << 20)
        servicer = InferenceServicer(_Runtime(service), None, None, budget, 120)  # type: ignore[arg-type]
        for rows in (1, 8):  # answers of 16 and 128 bytes of data, each with ~30 of fields
            context = _GrpcContext()
            call = context.start(servicer.ModelInfer(make(rows), context))
            _answer(await service.next_arrival(), rows)
            if rows == 1:
                await call
                continue
            with pytest.raises(_Aborted) as refused:
                await call
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "(120 bytes, max_message_bytes): ask for fewer rows" in refused.value.details
        assert [outcome(e) for e in service.failed] == ["answer_too_large"]
        assert budget.held == ANSWER_COPIES * ROW_BYTES, "only the answer sent, until it is"

    asyncio.run(main())


def test_only_answers_whose_size_the_config_fixes_are_reserved():
    assert expected_answer_bytes(VARIABLE) == 0
    strings = msgspec.structs.replace(MODEL, outputs=(TensorSpec("OUT", "BYTES", (4,)),))
    assert expected_answer_bytes(strings) == 0
    unbatched = msgspec.structs.replace(MODEL, max_batch_size=0)
    assert expected_answer_bytes(unbatched) == ANSWER_COPIES * ROW_BYTES


def test_an_answers_bytes_are_its_outputs_data_as_serialised():
    strings = np.array([b"ab", b""], dtype=object)
    floats = np.zeros((2, 3), np.float32)
    data = 24 + (2 + 0) + 2 * RAW_STRING_OVERHEAD
    assert answer_bytes([floats, strings]) == ANSWER_COPIES * data


@pytest.mark.parametrize("make", [_raw_request, _typed_request], ids=["raw", "typed"])
@pytest.mark.parametrize(
    "end",
    [
        "model_error",
        "deadline_in_queue",
        "cancelled",  # its caller cancelled, or gRPC ended the call at its deadline
    ],
)
def test_a_request_releases_its_bytes_on_every_way_it_can_end(make, end):
    async def main() -> tuple[int, int, BaseException | None]:
        servicer, service, budget = _servicer(1 << 20)
        call = asyncio.ensure_future(servicer.ModelInfer(make(1), _Context()))
        future = await service.next_arrival()
        held = budget.held
        if end == "model_error":
            future.set_exception(ModelExecutionError("the model failed"))
        elif end == "deadline_in_queue":
            future.set_exception(DeadlineExceededError("expired while queued"))
        else:
            call.cancel()
        try:
            await call
        except (_Aborted, asyncio.CancelledError) as exc:
            return held, budget.held, exc
        return held, budget.held, None

    held, after, error = asyncio.run(main())
    assert held > 0 and after == 0
    assert error is not None


def test_a_request_over_the_budget_is_refused_at_once_and_the_admitted_one_is_unharmed():
    async def main() -> tuple[Any, ...]:
        servicer, service, budget = _servicer(3 * 2 * ROW_BYTES)  # room for 3 rows
        first = asyncio.ensure_future(servicer.ModelInfer(_raw_request(2), _Context()))
        future = await service.next_arrival()
        held = budget.held
        with pytest.raises(_Aborted) as refused:
            await servicer.ModelInfer(_raw_request(2), _Context())
        queued = len(service.waiting)
        _answer(future, 2)
        response = await first
        return held, refused.value, queued, response, budget.held, service.failed

    held, refused, queued, response, after, failed = asyncio.run(main())
    assert held == 2 * 2 * ROW_BYTES
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        f"holds {held} bytes of requests and unsent answers in flight (limit {3 * 2 * ROW_BYTES}"
        in (refused.details)
    )
    assert queued == 1, "the refused request never reached the queue"
    assert list(response.outputs[0].shape) == [2, 4]
    assert after == 0
    assert [type(e) for e in failed] == [InflightLimitError], "the refusal is counted"


def test_a_request_larger_than_the_budget_is_refused_saying_it_never_fits():
    async def main() -> _Aborted:
        servicer, _, budget = _servicer(ROW_BYTES)
        with pytest.raises(_Aborted) as refused:
            await servicer.ModelInfer(_raw_request(8), _Context())
        assert budget.held == 0
        return refused.value

    refused = asyncio.run(main())
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "can never be admitted" in refused.details


def test_a_stream_request_over_the_budget_gets_its_own_error_and_the_stream_goes_on():
    async def main() -> tuple[list[Any], int]:
        servicer, service, budget = _servicer(3 * 2 * ROW_BYTES)
        second_sent = asyncio.Event()

        async def requests() -> Any:
            yield _raw_request(2)
            await service.arrived.wait()  # the first is admitted and waits for its answer
            second = _raw_request(2)
            second.id = "second"
            yield second
            second_sent.set()

        answers: list[Any] = []
        stream = servicer.ModelStreamInfer(requests(), _Context())  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            answers.append(await anext(stream))  # the refusal comes first
            _answer(service.waiting[0], 2)
            async for answer in stream:
                answers.append(answer)
        return answers, budget.held

    answers, held = asyncio.run(main())
    refused, answered = answers
    assert refused.infer_response.id == "second"
    assert "bytes of requests and unsent answers in flight" in refused.error_message
    assert not answered.error_message and list(answered.infer_response.outputs[0].shape) == [2, 4]
    assert held == 0


def test_a_relayed_call_is_admitted_once_and_released_after_its_reply(tmp_path: Path):
    async def main() -> tuple[int, int, Any]:
        servicer, service, budget = _servicer(1 << 20)
        health = SimpleNamespace(Check=None, Watch=None)
        hub = RelayHub(servicer, health, tmp_path, 1 << 20)  # type: ignore[arg-type]
        payload = _raw_request(2).SerializeToString()
        call = RelayCall(id=1, method=MODEL_INFER, timeout_s=None, payload=payload)
        reply = asyncio.ensure_future(hub.dispatch(call))
        future = await service.next_arrival()
        held = budget.held
        _answer(future, 2)
        answered = await reply
        return held, budget.held, answered

    held, after, reply = asyncio.run(main())
    assert held == 2 * 2 * ROW_BYTES, "one request's bytes, counted once"
    assert (reply.code, after) == (OK, 0)


def test_a_relayed_call_cancelled_by_its_relay_releases_its_bytes(tmp_path: Path):
    async def main() -> tuple[int, int]:
        servicer, service, budget = _servicer(1 << 20)
        health = SimpleNamespace(Check=None, Watch=None)
        hub = RelayHub(servicer, health, tmp_path, 1 << 20)  # type: ignore[arg-type]
        payload = _raw_request(2).SerializeToString()
        call = RelayCall(id=1, method=MODEL_INFER, timeout_s=5.0, payload=payload)
        reply = asyncio.ensure_future(hub.dispatch(call))
        await service.next_arrival()
        held = budget.held
        reply.cancel()  # RelayCancel: the caller went away, or its deadline passed
        with pytest.raises(asyncio.CancelledError):
            await reply
        return held, budget.held

    held, after = asyncio.run(main())
    assert held > 0 and after == 0
