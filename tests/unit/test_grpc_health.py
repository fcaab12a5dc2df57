"""grpc.health.v1 answers follow the models the runtime has (a stand-in runtime, no server)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from serve.frontend.gate import ReadinessGate
from serve.frontend.health import NOT_SERVING, SERVICE_UNKNOWN, SERVING, HealthService


class _Runtime:
    def __init__(self) -> None:
        self.models = ["a", "b"]
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def unload(self, name: str) -> None:
        self.models.remove(name)
        for listener in self._listeners:
            listener()

    @property
    def ready(self) -> bool:
        return True

    def model_names(self) -> list[str]:
        return list(self.models)

    def model_ready(self, name: str, version: str = "") -> bool:
        return True


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.written: list[int] = []

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)

    async def write(self, message: Any) -> None:
        self.written.append(message.status)


def test_an_unloaded_model_is_an_unknown_service_to_check_and_watch():
    async def main() -> tuple[int, list[int]]:
        runtime, gate = _Runtime(), ReadinessGate()
        gate.set(True)
        health = HealthService(runtime, gate)  # type: ignore[arg-type]
        request = health_pb2.HealthCheckRequest(service="a")
        before = (await health.Check(request, _Context())).status
        watch = _Context()
        watching = asyncio.create_task(health.Watch(request, watch))  # type: ignore[arg-type]
        async with asyncio.timeout(5):
            while not watch.written:
                await asyncio.sleep(0)
        runtime.unload("a")
        try:
            async with asyncio.timeout(5):
                while len(watch.written) < 2:
                    await asyncio.sleep(0)
        except TimeoutError:
            pass  # (the assertion below says what the watcher got)
        watching.cancel()
        with pytest.raises(_Aborted, match="unknown service 'a'"):
            await health.Check(request, _Context())
        assert (
            await health.Check(health_pb2.HealthCheckRequest(service="b"), _Context())
        ).status == SERVING
        return before, watch.written

    before, written = asyncio.run(main())
    assert before == SERVING and written == [SERVING, SERVICE_UNKNOWN]


def test_a_stop_ends_every_watch_after_its_not_serving_and_a_later_watch_at_once():
    async def main() -> tuple[list[int], list[int], list[int]]:
        runtime, gate = _Runtime(), ReadinessGate()
        gate.set(True)
        health = HealthService(runtime, gate)  # type: ignore[arg-type]
        watches = {service: _Context() for service in ("", "a")}
        watching = [
            asyncio.create_task(health.Watch(health_pb2.HealthCheckRequest(service=s), c))  # type: ignore[arg-type]
            for s, c in watches.items()
        ]
        async with asyncio.timeout(5):
            while not all(c.written for c in watches.values()):
                await asyncio.sleep(0)
        gate.set(False)  # the stop: readiness first ...
        health.close_watches()  # ... then the graceful stop
        async with asyncio.timeout(5):  # every Watch returns by itself (not cancelled)
            await asyncio.gather(*watching)
        late = _Context()
        async with asyncio.timeout(5):
            await health.Watch(health_pb2.HealthCheckRequest(service=""), late)  # type: ignore[arg-type]
        return watches[""].written, watches["a"].written, late.written

    whole, model, late = asyncio.run(main())
    assert whole == [SERVING, NOT_SERVING]
    assert model == [SERVING, NOT_SERVING]
    assert late == [NOT_SERVING]
