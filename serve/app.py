"""Composition root: builds the runtime and the front end, owns start/stop order and signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Protocol

from serve.bundles.repository import scan
from serve.config import Config
from serve.control import ModelControl
from serve.frontend.http_health import HttpHealth
from serve.frontend.server import GrpcFrontend
from serve.runtime import Runtime

log = logging.getLogger(__name__)


class Member(Protocol):
    """What a front-end process started by the supervisor (``frontends > 1``) is told."""

    shared_address: str  # the gRPC address all front-end processes share, joined once warm

    def started(self, http_port: int) -> None:
        """Tell the supervisor where this process answers health and /metrics."""

    def watch(self, stop: asyncio.Event) -> None:
        """Set ``stop`` when the supervisor goes away."""


async def serve(config: Config) -> int:
    """Serve ``config`` until SIGTERM/SIGINT: in this process, or with ``frontends > 1`` as the
    supervisor of that many front-end processes sharing the gRPC port."""
    if config.server.frontends > 1:
        from serve.supervisor import Supervisor

        return await Supervisor(config).run()
    return await serve_one(config)


async def serve_one(config: Config, member: Member | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain: readiness NOT_SERVING, the drain delay (calls are
    still served), then refuse new calls, finish in-flight ones within the grace period, stop.

    The gRPC port opens before the models warm up, so liveness answers at once while readiness
    stays false until every model has a warm worker. A ``member`` of several front-end
    processes joins the shared port only once it is warm (the kernel never routes a connection
    to a cold one) and stops on SIGTERM alone: its supervisor decides when.
    """
    sources, _refused = scan(Path(config.repository), Path(config.cache_dir) / "bundles")
    if not sources:
        log.warning("no models in %s: the server will never be ready", config.repository)
    runtime = Runtime(sources, log_level=config.server.log_level)
    control = ModelControl(
        runtime, config.server, Path(config.repository), Path(config.cache_dir) / "bundles"
    )
    frontend = GrpcFrontend(config.server, runtime, control)
    http = (
        HttpHealth(runtime, frontend.gate, config.server.host, config.server.http_port)
        if config.server.http_port >= 0
        else None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM,) if member else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    await frontend.start()
    if http is not None:
        await http.start()
    if member is not None:
        member.started(http.port if http is not None else -1)
        member.watch(stop)
    warm_up = asyncio.create_task(_warm_up(runtime, frontend, member), name="warm-up")
    warm_up.add_done_callback(lambda task: _on_warm_up_done(task, stop))
    try:
        await stop.wait()
    finally:
        log.info(
            "shutting down: refusing new calls, in-flight calls get %.1f s",
            config.server.grace_period_s,
        )
        frontend.begin_drain()
        if config.server.drain_delay_s > 0:
            log.info("readiness is NOT_SERVING; draining for %.1f s", config.server.drain_delay_s)
            await asyncio.sleep(config.server.drain_delay_s)  # load balancers notice, stop sending
        if not warm_up.done():
            warm_up.cancel()
        await asyncio.gather(warm_up, return_exceptions=True)
        await frontend.stop(config.server.grace_period_s)
        if http is not None:
            await http.stop()
        await runtime.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)
        log.info("stopped")
    failed = warm_up.done() and not warm_up.cancelled() and warm_up.exception() is not None
    return 1 if failed else 0


async def _warm_up(runtime: Runtime, frontend: GrpcFrontend, member: Member | None) -> None:
    await runtime.start()
    await frontend.open_gate()
    if member is not None:
        await frontend.listen_shared(member.shared_address)
    log.info("ready: %s", ", ".join(f"{s.name} {s.state.value}" for s in runtime.statuses()))


def _on_warm_up_done(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("warm-up failed, stopping: %s", task.exception(), exc_info=task.exception())
        stop.set()


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("received %s", sig.name)
    stop.set()
