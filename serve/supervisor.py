"""Several front-end processes on one gRPC port (``--frontends N``).

One Python gRPC process tops out at a few thousand calls a second: its event-loop thread is the
ceiling, whatever the GPU could take (benchmarks/RESULTS.md). With ``frontends = N`` the
supervisor starts N front-end processes. Each is a whole warmserve (front end, batcher, warm
pool of workers) and joins the gRPC port with SO_REUSEPORT only once it is warm, so the kernel
spreads new connections over warm processes alone. The supervisor holds the port from the
start, serves the HTTP port for all of them (readiness, latency, /metrics), restarts one that
exits, and on SIGTERM drains and stops them in order.

Connections, not calls, are spread: one client channel stays with one process. Many clients
(or a client with several channels) spread evenly.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from serve.config import Config
from serve.errors import ConfigError
from serve.frontend.fanout import FanOutHealth

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a front-end process reports its HTTP port (imports, bundle scan)
STOP_MARGIN_S = 10.0  # beyond the grace period, before a front-end process is killed
BACKOFF_S = (1.0, 30.0)  # restart delay: first, longest (doubling between)
STABLE_AFTER_S = 60.0  # a process that ran this long restarts without delay


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold ``host:port`` (0: a free one) for the front-end processes: a bound socket with
    SO_REUSEPORT that never listens, so the port stays ours while they come and go, and a
    process of another user cannot take it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host, port))
    except OSError as exc:
        holder.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from None
    return holder


class FrontendProcess:
    """The supervisor's handle on one front-end process."""

    def __init__(self, index: int, config: Config, shared_address: str) -> None:
        self.index = index
        self._config = config
        self._shared_address = shared_address
        self._process: Any = None
        self._conn: Connection | None = None
        self.http_port = -1
        self.started_at = 0.0

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(
            target=run_frontend,
            args=(self._config, self.index, self._shared_address, theirs),
            name=f"warmserve-frontend-{self.index}",
        )
        self._process.start()
        theirs.close()
        self._conn = ours
        self.http_port = -1
        self.started_at = time.monotonic()

    async def reported(self, timeout: float) -> None:
        """Wait for the process to report its HTTP port."""
        assert self._conn is not None
        async with asyncio.timeout(timeout):
            await _readable(self._conn.fileno())
        self.http_port = int(self._conn.recv())

    async def exited(self) -> int:
        await _readable(self._process.sentinel)
        self._process.join()
        if self._conn is not None:
            self._conn.close()  # the process sees EOF if it still runs (it does not)
            self._conn = None
        self.http_port = -1
        return int(self._process.exitcode)

    def terminate(self) -> None:
        if self.alive:
            self._process.terminate()

    def kill(self) -> None:
        if self.alive:
            log.warning("front-end process %d did not stop in time; killing it", self.index)
            self._process.kill()


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class Supervisor:
    def __init__(self, config: Config) -> None:
        self._config = config
        self.members: list[FrontendProcess] = []
        self.stopping = False
        self.restarts = [0] * config.server.frontends

    def _member_config(self) -> Config:
        """Each front-end process answers health on a private loopback port of its own; the
        supervisor serves the public HTTP port and drains before it stops them."""
        server = msgspec.structs.replace(
            self._config.server,
            host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            health_port=-1,
            drain_delay_s=0.0,
            frontends=1,
        )
        return msgspec.structs.replace(self._config, server=server)

    async def run(self) -> int:
        server = self._config.server
        holder = reserve_port(server.host, server.grpc_port)
        port = holder.getsockname()[1]
        shared = f"[{server.host}]:{port}" if ":" in server.host else f"{server.host}:{port}"
        member_config = self._member_config()
        self.members = [FrontendProcess(i, member_config, shared) for i in range(server.frontends)]
        http = FanOutHealth(self, server.host, server.http_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        keepers: list[asyncio.Task[None]] = []
        try:
            await http.start()
            log.info("supervising %d front-end processes on %s", server.frontends, shared)
            keepers = [
                asyncio.create_task(self._keep(m), name=f"keep-frontend-{m.index}")
                for m in self.members
            ]
            await stop.wait()
            log.info("shutting down %d front-end processes", len(self.members))
            self.stopping = True  # readiness answers 503 from now on
            if server.drain_delay_s > 0:
                log.info("readiness is NOT_SERVING; draining for %.1f s", server.drain_delay_s)
                await asyncio.sleep(server.drain_delay_s)
        finally:
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            await self._stop_members(server.grace_period_s + STOP_MARGIN_S)
            await http.stop()
            holder.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            log.info("stopped")
        return 0

    async def _keep(self, member: FrontendProcess) -> None:
        """Run ``member``; when it exits, start it again (with a growing delay if it keeps
        exiting soon after it starts)."""
        delay = BACKOFF_S[0]
        while True:
            member.start()
            log.info("front-end process %d started (pid %s)", member.index, member.pid)
            try:
                await member.reported(START_TIMEOUT_S)
            except TimeoutError:
                log.error(
                    "front-end process %d did not report within %.0f s; killing it",
                    member.index,
                    START_TIMEOUT_S,
                )
                member.kill()
            except (EOFError, OSError):
                pass  # it exited before reporting; exited() says how
            code = await member.exited()
            ran_s = time.monotonic() - member.started_at
            if ran_s >= STABLE_AFTER_S:
                delay = BACKOFF_S[0]
            self.restarts[member.index] += 1
            log.warning(
                "front-end process %d exited with code %s after %.1f s; restarting in %.1f s",
                member.index,
                code,
                ran_s,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _stop_members(self, timeout: float) -> None:
        running = [m for m in self.members if m.alive]
        for member in running:
            member.terminate()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(m.exited() for m in running))
        except TimeoutError:
            for member in running:
                member.kill()
            await asyncio.gather(*(m.exited() for m in running))


class _Member:
    """The front-end process's side: report the HTTP port, stop when the supervisor is gone."""

    def __init__(self, shared_address: str, conn: Connection) -> None:
        self.shared_address = shared_address
        self._conn = conn

    def started(self, http_port: int) -> None:
        self._conn.send(http_port)

    def watch(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()

        def gone() -> None:
            try:
                self._conn.recv()  # the supervisor sends nothing: readable means it is gone
            except (EOFError, OSError):
                loop.remove_reader(self._conn.fileno())
                log.warning("the supervisor is gone; stopping")
                stop.set()

        loop.add_reader(self._conn.fileno(), gone)


def run_frontend(config: Config, index: int, shared_address: str, conn: Connection) -> None:
    """Entry point of a front-end process (spawned by the supervisor)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which decides
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format=f"%(asctime)s %(levelname)s frontend-{index} %(name)s: %(message)s",
    )
    import uvloop

    from serve.app import serve_one

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(serve_one(config, _Member(shared_address, conn)))
    sys.exit(code)
