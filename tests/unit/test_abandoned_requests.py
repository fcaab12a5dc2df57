"""A call that ends while its request is still queued (its caller cancelled, or gRPC ended it
at its deadline) leaves no arrays in the queue: its budget is released, so its memory must go
too, not when a worker frees a slot (a long batch, a hung worker until its watchdog)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from serve.frontend.admission import InflightBudget
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.servicer import InferenceServicer
from serve.telemetry.stats import ModelStats
from tests.unit.test_admission import MODEL


class _Service:
    """A model version whose queue never moves (every worker busy); it keeps what it is given."""

    def __init__(self) -> None:
        self.config = MODEL
        self.parameters: dict[str, Any] = {}
        self.codec: Any = None
        self.stats = ModelStats()
        self.queued: list[list[Any]] = []
        self.arrived = asyncio.Event()

    def submit(self, inputs: list[Any], rows: int, deadline: float | None) -> Any:
        self.queued.append(inputs)
        self.arrived.set()
        return asyncio.get_running_loop().create_future()

    def request_abandoned(self, elapsed_ns: int, expired: bool) -> None:
        pass


class _Runtime:
    def __init__(self, service: _Service) -> None:
        self._service = service

    def service(self, name: str, version: str = "") -> _Service:
        return self._service


class _Context:
    def time_remaining(self) -> float | None:
        return None


def test_a_cancelled_call_leaves_no_arrays_in_the_queue():
    async def main() -> tuple[int, list[Any]]:
        service = _Service()
        budget = InflightBudget(1 << 20)
        servicer = InferenceServicer(_Runtime(service), None, None, budget)  # type: ignore[arg-type]
        request = pb.ModelInferRequest(model_name="m")
        request.inputs.add(name="IN", datatype="FP32", shape=[2, 4])
        request.raw_input_contents.append(np.ones((2, 4), np.float32).tobytes())
        call = asyncio.ensure_future(servicer.ModelInfer(request, _Context()))
        async with asyncio.timeout(10):
            await service.arrived.wait()
        queued = len(service.queued[0])
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        return queued, service.queued[0]

    queued, left = asyncio.run(main())
    assert queued == 1  # (the request was queued with its one input)
    assert left == []  # what the queue still holds of it: no arrays
