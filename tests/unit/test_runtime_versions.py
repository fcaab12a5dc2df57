"""Versions of a model: which one serves after rollouts, rollbacks and watch windows end."""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

import serve.runtime
from serve.bundles.repository import ModelSource
from serve.config import ModelConfig, TensorSpec
from serve.errors import InvalidBundleError
from serve.model_service import ModelState
from serve.readiness.latency import ModelLatency
from serve.runtime import Runtime

SPEC = (TensorSpec("x", "FP32", (1,)),)


class _Version:
    """A model version that is ready at once, until the test says it falters."""

    def __init__(self, source: ModelSource, on_start: Callable[[], None] | None = None) -> None:
        self.config = source.model
        self.bundle_id = source.bundle_id
        self.state = ModelState.LOADING
        self.latency = ModelLatency()
        self.failing = False
        self.stopped = False
        self.on_start = on_start
        self.gate: asyncio.Event | None = None  # set: start() waits for it (a slow warm-up)
        self.drain_gate: asyncio.Event | None = None  # set: drain() waits for it (in flight)
        self.stop_steps = 0  # loop iterations stop() takes (workers that take time to exit)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY and not self.failing

    def readiness_reason(self) -> str:
        return "probes fail" if self.failing else ""

    async def start(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if not self.stopped:  # (a service stopped while it warmed up stays stopped)
            self.state = ModelState.READY
        if self.on_start is not None:
            self.on_start()

    async def drain(self) -> None:
        if self.drain_gate is not None:
            await self.drain_gate.wait()
        await self.stop()

    async def stop(self, batch_wait_s: float = 0.0) -> None:
        self.state = ModelState.UNAVAILABLE
        for _ in range(self.stop_steps):
            await asyncio.sleep(0)
        self.stopped = True


class _Timers:
    """asyncio for serve.runtime with keep-warm periods that end when the test says so (a
    watch tick, WATCH_TICK_S = 0 here, just yields)."""

    def __init__(self) -> None:
        self.waiting: dict[float, list[asyncio.Future[None]]] = {}
        self.module = types.SimpleNamespace(**vars(asyncio))
        self.module.sleep = self.sleep

    async def sleep(self, delay: float) -> None:
        if delay <= 0:
            return await asyncio.sleep(0)
        future = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(delay, []).append(future)
        await future

    async def end(self, delay: float) -> None:
        """End every keep-warm period of ``delay`` seconds started so far."""
        async with asyncio.timeout(10):
            while not self.waiting.get(delay):
                await asyncio.sleep(0)
        for future in self.waiting.pop(delay):
            future.set_result(None)


def _runtime(monkeypatch: pytest.MonkeyPatch, **hooks: Callable[[], None]) -> tuple[Runtime, dict]:
    monkeypatch.setattr(serve.runtime, "WATCH_TICK_S", 0)
    runtime, made = Runtime([]), {}

    def service(source: ModelSource) -> Any:
        made[source.model.version] = _Version(source, hooks.get("v" + source.model.version))
        return made[source.model.version]

    runtime._service = service  # type: ignore[method-assign]
    return runtime, made


def _source(version: str) -> ModelSource:
    model = ModelConfig("m", "onnx", "m.onnx", SPEC, SPEC, version=version)
    return ModelSource(model, f"bundle-{version}")


def _active(runtime: Runtime) -> str:
    return runtime.service("m").config.version


def _loaded(runtime: Runtime) -> list[str]:
    return sorted(s.config.version for s in runtime.versions("m"))


async def _finished(tasks: set[asyncio.Task[None]]) -> None:
    async with asyncio.timeout(10):
        await asyncio.gather(*tasks)


def test_a_watch_of_a_version_already_replaced_does_not_switch_back_to_an_older_one(monkeypatch):
    """Version 2 is watched; version 3 replaces it; version 2 then falters. Its watch ends: it
    must not "roll back" to version 1 over version 3, which the operator just rolled out."""

    async def main() -> str:
        runtime, made = _runtime(monkeypatch, v3=lambda: setattr(made["2"], "failing", True))
        await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=0)
        await runtime.rollout(_source("2"), watch_s=1000, keep_previous_s=0)
        watch_of_2 = set(runtime._entries["m"].tasks)
        await runtime.rollout(_source("3"), watch_s=0, keep_previous_s=0)
        await _finished(watch_of_2)
        active = _active(runtime)
        await runtime.stop()
        return active

    assert asyncio.run(main()) == "3"


def test_the_previous_version_stays_warm_for_a_watch_that_began_after_an_earlier_keep_period(
    monkeypatch,
):
    """1 → 2 (1 kept warm 100 s), rollback to 1, 2 again (1 kept for its watch): the first keep
    period ending must not retire version 1, or a failing 2 could not be rolled back."""
    timers = _Timers()
    monkeypatch.setattr(serve.runtime, "asyncio", timers.module)

    async def main() -> None:
        runtime, made = _runtime(monkeypatch)
        await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=100)
        await runtime.rollout(_source("2"), watch_s=0, keep_previous_s=100)
        first_keep = set(runtime._entries["m"].tasks)
        await runtime.rollback("m", keep_previous_s=200)
        before = set(runtime._entries["m"].tasks)
        await runtime.rollout(_source("2"), watch_s=1000, keep_previous_s=300)
        watch = set(runtime._entries["m"].tasks) - before
        try:
            await timers.end(100)  # the keep period of the first rollout
            await _finished(first_keep)
            assert _loaded(runtime) == ["1", "2"] and not made["1"].stopped
            made["2"].failing = True
            await _finished(watch)
            assert (_active(runtime), _loaded(runtime)) == ("1", ["1"])
            await timers.end(200)  # the rollback's keep period of version 2, gone already
            assert _loaded(runtime) == ["1"]
        finally:
            await runtime.stop()

    asyncio.run(main())


def test_the_previous_version_is_retired_when_its_keep_period_ends(monkeypatch):
    timers = _Timers()
    monkeypatch.setattr(serve.runtime, "asyncio", timers.module)

    async def main() -> tuple[list[str], list[str], bool]:
        runtime, made = _runtime(monkeypatch)
        await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=100)
        await runtime.rollout(_source("2"), watch_s=0, keep_previous_s=100)
        kept = _loaded(runtime)
        await timers.end(100)
        await _finished(set(runtime._entries["m"].tasks))
        result = kept, _loaded(runtime), made["1"].stopped
        await runtime.stop()
        return result

    assert asyncio.run(main()) == (["1", "2"], ["2"], True)


def _rebuilt(version: str) -> ModelSource:
    """Version ``version`` built again from other files: another bundle under the same label."""
    return ModelSource(_source(version).model, f"bundle-{version}-rebuilt")


def test_a_retired_version_label_can_be_loaded_again_with_a_rebuilt_bundle(monkeypatch):
    """1 → 2 → 3, each previous version retired: version 1 is nowhere any more, so a rebuilt
    bundle labelled 1 is not "loaded with different content"."""

    async def main() -> None:
        runtime, made = _runtime(monkeypatch)
        try:
            for version in ("1", "2", "3"):
                await runtime.rollout(_source(version), watch_s=0, keep_previous_s=0)
            await _finished(set(runtime._entries["m"].tasks))
            assert _loaded(runtime) == ["3"]
            await runtime.rollout(_rebuilt("1"), watch_s=0, keep_previous_s=0)
            assert (_active(runtime), made["1"].bundle_id) == ("1", "bundle-1-rebuilt")
        finally:
            await runtime.stop()

    asyncio.run(main())


def test_an_unloaded_version_label_can_be_loaded_again_with_a_rebuilt_bundle(monkeypatch):
    async def main() -> None:
        runtime, made = _runtime(monkeypatch)
        try:
            await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=1000)
            await runtime.rollout(_source("2"), watch_s=0, keep_previous_s=1000)
            await runtime.unload("m", "1")
            await runtime.rollout(_rebuilt("1"), watch_s=0, keep_previous_s=1000)
            assert (_active(runtime), made["1"].bundle_id) == ("1", "bundle-1-rebuilt")
        finally:
            await runtime.stop()

    asyncio.run(main())


def test_the_retired_previous_version_stays_the_rollback_target_and_says_so(monkeypatch):
    """Version 1's keep period ended: a rollback still warms version 1's own bundle again, so
    a rebuilt bundle under label 1 is refused, saying why (it is not loaded)."""

    async def main() -> None:
        runtime, made = _runtime(monkeypatch)
        try:
            await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=0)
            await runtime.rollout(_source("2"), watch_s=0, keep_previous_s=0)
            await _finished(set(runtime._entries["m"].tasks))
            assert _loaded(runtime) == ["2"]
            with pytest.raises(InvalidBundleError) as refused:
                await runtime.rollout(_rebuilt("1"), watch_s=0, keep_previous_s=0)
            assert "is the previous version (kept for a rollback)" in str(refused.value)
            assert "is loaded" not in str(refused.value)
            assert await runtime.rollback("m", keep_previous_s=0) == "1"
            assert (_active(runtime), made["1"].bundle_id) == ("1", "bundle-1")
        finally:
            await runtime.stop()

    asyncio.run(main())


def test_a_rollback_does_not_return_to_the_version_its_watch_rolled_back(monkeypatch):
    """Version 2 failed its watch and was rolled back to 1, so 2 is now "the previous version":
    an operator's rollback must not put it back (cold, and with no watch) as if it were good."""

    async def main() -> None:
        runtime, made = _runtime(monkeypatch)
        try:
            await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=1000)
            await runtime.rollout(_source("2"), watch_s=1000, keep_previous_s=1000)
            watch = set(runtime._entries["m"].tasks)
            made["2"].failing = True
            await _finished(watch)
            assert (_active(runtime), _loaded(runtime)) == ("1", ["1"])
            with pytest.raises(InvalidBundleError) as refused:
                await runtime.rollback("m", keep_previous_s=1000)
            message = str(refused.value)
            assert "version '2'" in message and "rolled back automatically" in message
            assert "probes fail" in message and "load version '2' explicitly" in message
            assert (_active(runtime), _loaded(runtime)) == ("1", ["1"])
            made["2"].failing = False  # the operator loads it on purpose: it gets its chance
            await runtime.rollout(_source("2"), watch_s=0, keep_previous_s=1000)
            assert await runtime.rollback("m", keep_previous_s=1000) == "1"
            assert _active(runtime) == "1"
        finally:
            await runtime.stop()

    asyncio.run(main())


def test_a_version_failing_its_watch_with_no_ready_version_to_return_to_is_logged(
    monkeypatch, caplog
):
    timers = _Timers()
    monkeypatch.setattr(serve.runtime, "asyncio", timers.module)

    async def main() -> None:
        runtime, made = _runtime(monkeypatch)
        monkeypatch.setattr(serve.runtime, "WATCH_TICK_S", 7)  # a tick ends when the test says
        try:
            await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=0)
            await runtime.rollout(_source("2"), watch_s=1000, keep_previous_s=0)
            made["1"].failing = made["2"].failing = True
            await timers.end(7)  # the first tick: version 2 fails, version 1 cannot take over
            await timers.end(7)  # (the watch is waiting for its next tick: the first is over)
            await timers.end(7)
            assert _active(runtime) == "2"
        finally:
            await runtime.stop()

    with caplog.at_level(logging.WARNING, logger="serve.runtime"):
        asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per watch, not once per tick
    assert "version 2 falters in its rollout watch (probes fail)" in warnings[0]
    assert "version 1 is not ready to take over (probes fail)" in warnings[0]
    assert "no automatic rollback" in warnings[0]


def test_a_keep_period_that_ends_while_its_version_warms_up_again_leaves_the_new_one_alone(
    monkeypatch,
):
    """1 → 2 (1 kept warm 100 s); the operator unloads 1 and loads it again. The keep period
    of the first version 1 ends while the new one warms up: it must not retire the new one,
    or the load switches to a version that is no longer there (no active version)."""
    timers = _Timers()
    monkeypatch.setattr(serve.runtime, "asyncio", timers.module)

    async def main() -> None:
        runtime, made = _runtime(monkeypatch)
        try:
            await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=100)
            await runtime.rollout(_source("2"), watch_s=0, keep_previous_s=100)
            keep = set(runtime._entries["m"].tasks)
            await runtime.unload("m", "1")
            first = made["1"]
            gate = asyncio.Event()

            def slow(source: ModelSource) -> Any:
                made[source.model.version] = _Version(source)
                made[source.model.version].gate = gate
                return made[source.model.version]

            runtime._service = slow  # type: ignore[method-assign]
            load = asyncio.ensure_future(
                runtime.rollout(_source("1"), watch_s=0, keep_previous_s=100)
            )
            async with asyncio.timeout(10):
                while made["1"] is first:
                    await asyncio.sleep(0)
            await timers.end(100)  # the keep period of the first version 1
            await _finished(keep)
            gate.set()
            async with asyncio.timeout(10):
                await load
            assert _active(runtime) == "1" and not made["1"].stopped
            assert _loaded(runtime) == ["1", "2"]
        finally:
            await runtime.stop()

    asyncio.run(main())


def test_unloading_every_version_while_a_keep_period_retires_one_of_them_unloads_the_model(
    monkeypatch,
):
    """Unload of the whole model: the active version drains (calls in flight) while the
    previous version's keep period ends and retires it. The unload must not then fail
    NOT_FOUND for that version and leave the model listed with no version at all."""
    timers = _Timers()
    monkeypatch.setattr(serve.runtime, "asyncio", timers.module)

    async def main() -> None:
        runtime, made = _runtime(monkeypatch)
        try:
            await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=100)
            await runtime.rollout(_source("2"), watch_s=0, keep_previous_s=100)
            await runtime.rollback("m", keep_previous_s=200)  # 1 active, 2 kept warm
            keep = {t for t in runtime._entries["m"].tasks}
            made["1"].drain_gate = gate = asyncio.Event()
            unload = asyncio.ensure_future(runtime.unload("m"))
            async with asyncio.timeout(10):
                while "1" in {s.config.version for s in runtime.versions("m")}:
                    await asyncio.sleep(0)
            await timers.end(200)  # version 2's keep period ends while 1 drains
            await timers.end(100)
            await _finished(keep)
            gate.set()
            async with asyncio.timeout(10):
                await unload
            assert runtime.model_names() == [] and made["1"].stopped and made["2"].stopped
        finally:
            await runtime.stop()

    asyncio.run(main())


def test_an_unload_returns_once_a_version_retiring_meanwhile_has_stopped_too(monkeypatch):
    """Version 1's keep period ended and it drains; the model is unloaded meanwhile. The unload
    cuts that drain short: it must return only once version 1 has stopped as well (the server
    may stop next, and would not wait for a version it no longer lists: leaked workers)."""
    timers = _Timers()
    monkeypatch.setattr(serve.runtime, "asyncio", timers.module)

    async def main() -> None:
        runtime, made = _runtime(monkeypatch)
        try:
            await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=100)
            await runtime.rollout(_source("2"), watch_s=0, keep_previous_s=100)
            made["1"].drain_gate = asyncio.Event()  # calls in flight: never done here
            made["1"].stop_steps = 5
            await timers.end(100)
            async with asyncio.timeout(10):
                while _loaded(runtime) != ["2"]:  # retiring: taken out, draining
                    await asyncio.sleep(0)
            await runtime.unload("m")
            assert made["1"].stopped and made["2"].stopped
        finally:
            await runtime.stop()

    asyncio.run(main())


def test_a_server_stopping_while_a_refused_version_stops_stops_it_still(monkeypatch):
    """Version 2 fails its probes, so its rollout stops it; the server stops meanwhile (the
    rollout cancelled). Version 2 must still be stopped, not left half-stopped and unlisted."""

    def fails(version: _Version) -> None:
        version.failing, version.stop_steps = True, 50  # (its workers take a while to exit)

    async def main() -> None:
        runtime, made = _runtime(monkeypatch, v2=lambda: fails(made["2"]))
        try:
            await runtime.rollout(_source("1"), watch_s=0, keep_previous_s=0)
            rollout = asyncio.ensure_future(
                runtime.rollout(_source("2"), watch_s=0, keep_previous_s=0)
            )
            async with asyncio.timeout(10):  # its rollout is stopping it
                while "2" not in made or made["2"].state is not ModelState.UNAVAILABLE:
                    await asyncio.sleep(0)
        finally:
            await runtime.stop()
        with pytest.raises(asyncio.CancelledError):
            await rollout
        assert made["2"].stopped

    asyncio.run(main())


class _Throttle:
    def __init__(self, stopping: bool) -> None:
        self.stopping = stopping

    def throttled_within(self, seconds: float) -> bool:
        return self.stopping


@pytest.mark.parametrize("cpu_limit_stops_it", [False, True])
def test_a_version_over_its_latency_budget_is_rolled_back_unless_the_cpu_limit_stops_the_server(
    monkeypatch, caplog, cpu_limit_stops_it
):
    """While the CPU limit stops the server, the old version would wait just the same."""
    timers = _Timers()
    monkeypatch.setattr(serve.runtime, "asyncio", timers.module)
    monkeypatch.setattr(serve.runtime, "throttle_watch", lambda: _Throttle(cpu_limit_stops_it))

    def budgeted(version: str) -> ModelSource:
        model = ModelConfig("m", "onnx", "m.onnx", SPEC, SPEC, version=version)
        return ModelSource(msgspec.structs.replace(model, latency_budget_ms=5.0), f"b-{version}")

    async def main() -> None:
        runtime, made = _runtime(monkeypatch)
        monkeypatch.setattr(serve.runtime, "WATCH_TICK_S", 7)  # a tick ends when the test says
        try:
            await runtime.rollout(budgeted("1"), watch_s=0, keep_previous_s=0)
            await runtime.rollout(budgeted("2"), watch_s=1000, keep_previous_s=1000)
            for _ in range(20):
                made["2"].latency.end_to_end.add(0.050)  # P95 50 ms, over the 5 ms budget
            await timers.end(7)  # the first tick: the watch finds version 2 over its budget
            async with asyncio.timeout(10):  # (the rollback switches within a few loop turns)
                while not cpu_limit_stops_it and _active(runtime) == "2":
                    await asyncio.sleep(0)
            if cpu_limit_stops_it:
                await timers.end(7)  # the watch waits for its next tick: the first is over
            assert _active(runtime) == ("2" if cpu_limit_stops_it else "1")
        finally:
            await runtime.stop()

    with caplog.at_level(logging.INFO, logger="serve.runtime"):
        asyncio.run(main())
    said = "P95 50.0 ms over the 5 ms budget while the CPU limit stops this server"
    assert (said in caplog.text) == cpu_limit_stops_it
