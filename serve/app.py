"""Composition root: builds the runtime and the front end, owns start/stop order and signals."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

from serve.bundles.cache import BundleCache
from serve.bundles.repository import scan
from serve.config import Config, ServerConfig
from serve.control import ModelControl
from serve.cpus import cpu_quotas, read_limit, tightest_quota
from serve.frontend.http_health import HttpHealth
from serve.frontend.server import GrpcFrontend
from serve.memory import freeze_long_lived
from serve.pool import template, worker_handle
from serve.pool.loop_spin import MOST_BATCHES, SPIN
from serve.runtime import Runtime
from serve.supervisor import (
    STOP_MARGIN_S,
    RelayPort,
    clients_left_busy_at_stop,
    connection_drain_s,
    wait_until,
)
from serve.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["StopSignals", "connection_drain_s", "serve", "shutdown_budget_s"]


def shutdown_budget_s(server: ServerConfig) -> float:
    """The longest SIGTERM → exit can take: the drain delay, the wait for busy clients to move
    away (connection_drain_s), the grace period for calls in flight (+ the relays' margin before
    they are killed), then the workers' stop timeout (all at once; running batches are not
    waited for, their callers are gone) and the worker template's.
    A pod's terminationGracePeriodSeconds must exceed it (tests/unit/test_deploy.py checks)."""
    relays = STOP_MARGIN_S if server.frontends > 1 else 0.0
    return (
        server.drain_delay_s
        + connection_drain_s(server)
        + server.grace_period_s
        + relays
        + worker_handle.STOP_TIMEOUT_S
        + template.STOP_TIMEOUT_S
    )


async def serve(config: Config) -> int:
    """Serve until SIGTERM/SIGINT, then drain: readiness NOT_SERVING, the drain delay (calls are
    still served), then stop listening and wait (connection_drain_s) until no client is busy on
    the port, then refuse new calls, finish in-flight ones within the grace period, stop. A
    second signal cuts the drain delay and the wait short.

    The gRPC port opens before the models warm up, so liveness answers at once while readiness
    stays false until every model has a warm worker. With ``frontends > 1`` the port is served
    by that many relay processes that pass each call to this process (serve/supervisor.py).
    """
    cache = BundleCache(Path(config.cache_dir) / "bundles")
    sources, _refused = scan(Path(config.repository), cache)
    cache.collect(s.bundle_id for s in sources)  # what earlier runs left that none uses
    if not sources:
        log.warning("no models in %s: the server will never be ready", config.repository)
    left_busy = clients_left_busy_at_stop(config.server)
    if left_busy is not None:
        log.warning("%s", left_busy)
    runtime = Runtime(
        sources,
        log_level=config.server.log_level,
        require_gpu=config.server.require_gpu,
        metrics=Metrics(warm_up=True),  # counted apart until readiness opens (_warm_up)
    )
    control = ModelControl(runtime, config.server, Path(config.repository), cache)
    frontend = GrpcFrontend(config.server, runtime, control)
    budget = frontend.budget
    runtime.metrics.watch_inflight(lambda: (budget.held, budget.limit))
    quota = tightest_quota(cpu_quotas())
    if quota is not None:
        runtime.metrics.watch_cpu_limit(functools.partial(read_limit, quota))
    http = (
        HttpHealth(runtime, frontend.gate, config.server.host, config.server.http_port)
        if config.server.http_port >= 0
        else None
    )
    relays = (
        RelayPort(config.server, frontend, runtime.metrics.registry)
        if config.server.frontends > 1
        else None
    )
    signals = StopSignals()
    stop, hurry = signals.stop, signals.hurry
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.received, sig)
    await frontend.start(private=relays is not None)  # relayed: loopback, for its own warm-up
    if http is not None:
        await http.start()
    if relays is not None:
        await relays.start()
    warm_up = asyncio.create_task(_warm_up(runtime, frontend, relays), name="warm-up")
    warm_up.add_done_callback(lambda task: _on_warm_up_done(task, stop))
    try:
        await stop.wait()
    finally:
        grace = config.server.grace_period_s
        log.info(
            "shutting down within %.0f s: in-flight calls get %.1f s",
            shutdown_budget_s(config.server),
            grace,
        )
        frontend.begin_drain()
        if config.server.drain_delay_s > 0:
            log.info(
                "readiness is NOT_SERVING; draining for %.1f s (a second signal stops sooner)",
                config.server.drain_delay_s,
            )
            # load balancers notice, stop sending
            await wait_until(asyncio.sleep(config.server.drain_delay_s), None, hurry)
        if not warm_up.done():
            warm_up.cancel()
        await asyncio.gather(warm_up, return_exceptions=True)
        wait = 0.0 if hurry.is_set() else connection_drain_s(config.server)
        if wait > 0:
            log.info(
                "stopping once no client is busy on the gRPC port (at most %.3g s; a second "
                "signal stops at once)",
                wait,
            )
        if relays is not None:
            await relays.stop(grace, wait, hurry)
        elif wait > 0:
            await wait_until(frontend.drain_connections(wait), wait + 1, hurry)
        await frontend.stop(grace)
        if http is not None:
            await http.stop()
        await runtime.stop()
        cache.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")
    failed = not warm_up.cancelled() and warm_up.exception() is not None
    return 1 if failed else 0


async def _warm_up(runtime: Runtime, frontend: GrpcFrontend, relays: RelayPort | None) -> None:
    await runtime.start()
    if relays is not None:
        await relays.wait_listening()  # ready only once the port takes calls
    freeze_long_lived("serving process")  # (before readiness: its full collection is long)
    await frontend.open_gate(relays.port if relays is not None else None)
    runtime.metrics.warm_up_over()  # (the user series start here, and only ever grow)
    statuses = ", ".join(f"{s.name} {s.state.value}" for s in runtime.statuses())
    if runtime.ready:
        log.info("ready: %s", statuses)
    else:  # (every model failed, or there is none: readiness stays NOT_SERVING)
        log.warning("start-up over, NOT ready: %s", statuses or "no model in the repository")
    if SPIN.enabled:
        log.info(
            "WARMSERVE_LOOP_SPIN: the serving loop polls while 1 to %d batches are out",
            MOST_BATCHES,
        )


def _on_warm_up_done(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("warm-up failed, stopping: %s", task.exception(), exc_info=task.exception())
        stop.set()


class StopSignals:
    """SIGTERM/SIGINT: the first sets ``stop``; a second one (a second Ctrl-C) sets ``hurry``.
    One that comes within REPEAT_WITHIN_S of the first is the same request delivered twice (a
    wrapper that forwards it while the terminal's process group gets it too) and is ignored."""

    REPEAT_WITHIN_S = 1.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self._clock = clock
        self._first_at = 0.0

    def received(self, sig: signal.Signals) -> None:
        now = self._clock()
        if not self.stop.is_set():
            log.info("received %s", sig.name)
            self._first_at = now
            self.stop.set()
        elif not self.hurry.is_set() and now - self._first_at >= self.REPEAT_WITHIN_S:
            log.info("received %s again: stopping without waiting for clients to move", sig.name)
            self.hurry.set()
