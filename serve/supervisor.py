"""The gRPC relay processes of ``--frontends N``: the shared port, starting, restarting, stopping.

One Python process tops out at a few thousand gRPC calls a second; its event-loop thread is the
ceiling, whatever the GPU could take (benchmarks/RESULTS.md). With ``frontends = N`` the serving
process holds the gRPC port and starts N relay processes (serve/frontend/relay.py) that bind it
with SO_REUSEPORT and pass every call to the serving process's hub. The kernel spreads
connections, not calls, over the relays: one client channel stays with one relay.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from serve.config import ServerConfig
from serve.errors import ConfigError
from serve.frontend.listener import QUIET_S, queued_connections_move
from serve.frontend.relay_hub import RelayHub
from serve.frontend.relay_wire import RelayRing
from serve.frontend.server import GrpcFrontend
from serve.pool.arena import create_memfd
from serve.telemetry.metrics import RelayCollector

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a relay reports its port (interpreter start, imports)
STOP_MARGIN_S = 5.0  # beyond the grace period, before a relay is killed
BACKOFF_S = (0.5, 30.0)  # restart delay: first, longest (doubling between)
STABLE_AFTER_S = 60.0  # a relay that ran this long restarts without delay
PING_EVERY_S = 1.0  # the hub pings each relay; one silent for relay_hang_s is killed
# A relay runs at least this long before its memory can get it recycled (relay_max_memory_mib):
# a limit set below a relay's own size recycles each relay this often, not in a loop.
RECYCLE_MIN_AGE_S = 120.0
# A drained relay (recycled) waits for its connections' GOAWAYs: their age, gRPC's 10 % jitter,
# then this long for the calls still on them.
DRAIN_MARGIN_S = 5.0


def drain_limit_s(connection_age_s: float) -> float:
    """How long a draining relay waits for its last connection (max_connection_age_s)."""
    return connection_age_s * 1.1 + DRAIN_MARGIN_S


def connection_drain_s(server: ServerConfig) -> float:
    """How long a stop waits, after the drain delay, for busy clients to leave the gRPC port as
    their connections reach max_connection_age_s (0 without an age): the grace period, or less
    where every connection reaches its age (and its calls finish) sooner."""
    if not server.max_connection_age_s:
        return 0.0
    return min(server.grace_period_s, drain_limit_s(server.max_connection_age_s))


def longest_age_that_moves_every_client_s(server: ServerConfig) -> float:
    """The longest max_connection_age_s with which every busy client moves off before a stop's
    graceful gRPC stop: a connection opened just before SIGTERM gets its GOAWAY within its age
    + gRPC's 10 %, and the stop sees it quiet QUIET_S later; meanwhile the drain delay and then
    at most the grace period (connection_drain_s) go by."""
    return (server.drain_delay_s + server.grace_period_s - QUIET_S) / 1.1


def clients_left_busy_at_stop(server: ServerConfig) -> str | None:
    """Why some busy clients may still be on the port when a stop's wait ends (and may have a
    call cancelled by gRPC's stop, grpc/grpc#41785), as a line for the log; None if they all
    move first (or there is no age: the stop then cancels such calls, as asked)."""
    age = server.max_connection_age_s
    longest = longest_age_that_moves_every_client_s(server)
    if not age or age <= longest:
        return None
    fix = "lengthen the drain delay or the grace period"
    if longest >= 1.0:  # (the shortest age allowed)
        most = math.floor(longest * 10) / 10
        flag = "--max-connection-age / WARMSERVE_MAX_CONNECTION_AGE_S"
        fix = f"set {flag} to {most:g} or less, or {fix}"
    return (
        f"a client connection gets its GOAWAY up to {age * 1.1:.3g} s after it opens "
        f"(max_connection_age_s {age:g} s + gRPC's 10 %), but a stop waits at most "
        f"{server.drain_delay_s + server.grace_period_s:.3g} s for busy clients to move away "
        f"(drain delay {server.drain_delay_s:g} s + grace period {server.grace_period_s:g} s): "
        "a client still busy then can have a call CANCELLED by the stop (grpc/grpc#41785); " + fix
    )


def anon_mib(pid: int) -> float | None:
    """The anonymous memory (heap, not shared or file pages) process ``pid`` holds, in MiB;
    None if it cannot be read (gone, another kernel)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold ``host:port`` (0: a free one) for the relays: a bound socket with SO_REUSEPORT that
    never listens, so the port stays the server's while relays come and go."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host, port))
    except OSError as exc:
        holder.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from None
    return holder


class InheritedFd:
    """A file descriptor for a spawned process. Pickled while the process starts, it goes
    through multiprocessing's spawning Popen, which passes it on as it does the Pipe's."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing.reduction import DupFd

        return _inherited, (DupFd(self.fd),)


def _inherited(dup: Any) -> InheritedFd:
    return InheritedFd(dup.detach())


class RelayProcess:
    """The serving process's handle on one relay process."""

    def __init__(
        self,
        index: int,
        args: tuple[Any, ...],
        rings: dict[int, RelayRing] | None = None,
        ring: tuple[int, int] = (0, 0),
    ) -> None:
        self.index = index
        self._args = args
        self._rings = rings if rings is not None else {}
        self._ring_slots, self._ring_slot_bytes = ring
        self._process: Any = None
        self._conn: Connection | None = None
        self.started_at = 0.0

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=False)
        ring_fd = -1
        if self._ring_slots:  # a fresh ring per start: the last one's calls may still hold views
            slots, slot_bytes = self._ring_slots, self._ring_slot_bytes
            ring_fd = create_memfd(f"warmserve-relay-{self.index}-ring", slots * slot_bytes)
            self._rings[self.index] = RelayRing(ring_fd, slots, slot_bytes)
        ring = (slots, slot_bytes, InheritedFd(ring_fd)) if ring_fd >= 0 else None
        self._process = context.Process(
            target=relay_main,
            args=(self.index, *self._args, ring, theirs),
            name=f"warmserve-relay-{self.index}",
        )
        try:
            self._process.start()
        finally:
            if ring_fd >= 0:
                os.close(ring_fd)  # mapped here; the relay has its own copy
        theirs.close()
        self._conn = ours
        self.started_at = time.monotonic()

    async def reported(self, timeout: float) -> int:
        """The port the relay listens on, once it does."""
        assert self._conn is not None
        async with asyncio.timeout(timeout):
            await _readable(self._conn.fileno())
        return int(self._conn.recv())

    async def exited(self) -> int:
        await _readable(self._process.sentinel)
        self._process.join()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        return int(self._process.exitcode)

    def terminate(self) -> None:
        if self.alive:
            self._process.terminate()

    def drain(self) -> None:
        """SIGUSR1: stop listening, let the clients move away, then stop gracefully."""
        if self.alive:
            os.kill(self._process.pid, signal.SIGUSR1)

    def leave(self) -> None:
        """SIGUSR2 (the whole server stops): stop listening, wait until no client is busy on
        it, then stop gracefully."""
        if self.alive:
            os.kill(self._process.pid, signal.SIGUSR2)

    def kill(self, reason: str = "did not stop in time") -> None:
        if self.alive:
            log.warning("relay %d %s; killing it", self.index, reason)
            self._process.kill()


async def wait_until(
    work: Awaitable[Any], limit_s: float | None, hurry: asyncio.Event | None
) -> None:
    """Wait for ``work`` at most ``limit_s`` (None: no limit) or until ``hurry`` is set; then
    cancel it if it has not finished. An error it raised is logged, not raised: this waits on
    the way to a stop, which goes on."""
    task = asyncio.ensure_future(work)
    waits = {task}
    if hurry is not None:
        waits.add(asyncio.ensure_future(hurry.wait()))
    try:
        await asyncio.wait(waits, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished = task.done()
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    if finished and not task.cancelled() and task.exception() is not None:
        log.error(
            "%s failed: %s",
            getattr(work, "__qualname__", work),
            task.exception(),
            exc_info=task.exception(),
        )


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


class Relays:
    """N relay processes on the configured gRPC address, kept running until stop()."""

    def __init__(
        self,
        config: ServerConfig,
        hub_path: Path,
        rings: dict[int, RelayRing] | None = None,
        ping: Callable[[int], float | None] | None = None,
        memory: Callable[[int], float | None] = anon_mib,
    ) -> None:
        """``ping(index)``: pings relay ``index`` through the hub and says how long it has been
        silent (None: not connected); without it, hung relays are not looked for. ``memory(pid)``:
        a relay's anonymous memory in MiB (relay_max_memory_mib)."""
        self._config = config
        self._hub_path = hub_path
        self._rings = rings if rings is not None else {}
        self._ping = ping
        self._holder: socket.socket | None = None
        self.members: list[RelayProcess] = []
        self.restarts = [0] * config.frontends
        self.hangs = [0] * config.frontends  # relays killed because they stopped answering
        self.recycles = [0] * config.frontends  # relays replaced for their memory
        self._memory = memory
        self._recycling: set[int] = set()  # relays finishing their calls before a new start
        self._keepers: list[asyncio.Task[None]] = []
        self._all_listened = asyncio.Event()
        self.listening: set[int] = set()
        self.on_listening: Callable[[], None] = lambda: None  # told when ``listening`` changes
        self.port = 0

    async def wait_listening(self) -> None:
        """Until every relay has listened once (readiness waits for this at start)."""
        await self._all_listened.wait()

    def start(self) -> None:
        config = self._config
        self._holder = reserve_port(config.host, config.grpc_port)
        self.port = self._holder.getsockname()[1]
        host = f"[{config.host}]" if ":" in config.host else config.host
        address = f"{host}:{self.port}"
        args = (
            str(self._hub_path),
            address,
            config.max_message_bytes,
            config.grace_period_s,
            config.log_level,
            max(1, config.max_inflight_bytes // config.frontends),  # each relay's share
            config.max_connection_age_s,
            drain_limit_s(config.max_connection_age_s),
            connection_drain_s(config),
        )
        ring = (config.relay_ring_slots, config.relay_ring_slot_kib * 1024)
        self.members = [RelayProcess(i, args, self._rings, ring) for i in range(config.frontends)]
        self._keepers = [
            asyncio.create_task(self._keep(m), name=f"keep-relay-{m.index}") for m in self.members
        ]
        log.info("gRPC on %s through %d relay processes", address, config.frontends)
        if config.max_connection_age_s and queued_connections_move() is False:
            log.info(
                "net.ipv4.tcp_migrate_req is 0: a client whose connection arrives in the instant "
                "a draining relay stops listening is reset, and retries after its back-off; "
                "with 1 the kernel hands that connection to another relay"
            )

    async def stop(
        self, grace_s: float, drain_s: float = 0.0, hurry: asyncio.Event | None = None
    ) -> None:
        """Stop restarting. ``drain_s``: first let every relay stop listening and wait until
        no client is busy on it (listener.drain), for at most that long or until ``hurry`` is
        set; then SIGTERM every relay still running (each finishes its calls within
        ``grace_s``)."""
        for keeper in self._keepers:
            keeper.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        running = [m for m in self.members if m.alive]
        # (a relay being recycled drains already: it follows the stop; others have not listened)
        leaving = [m for m in running if m.index in self.listening | self._recycling]
        if drain_s > 0 and leaving:
            for member in running:
                if member in leaving:
                    member.leave()
                else:
                    member.terminate()
            await wait_until(asyncio.gather(*(m.exited() for m in leaving)), drain_s, hurry)
        for member in running:
            if member.alive:
                member.terminate()  # (one that is stopping already: nothing more)
        try:
            async with asyncio.timeout(grace_s + STOP_MARGIN_S):
                await asyncio.gather(*(m.exited() for m in running))
        except TimeoutError:
            for member in running:
                member.kill()
            await asyncio.gather(*(m.exited() for m in running))
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    async def _keep(self, member: RelayProcess) -> None:
        """Run ``member``; when it exits, start it again (with a growing delay if it keeps
        exiting soon after it starts)."""
        delay = BACKOFF_S[0]
        while True:
            try:
                member.start()
            except Exception as exc:  # (out of processes or file descriptors, say): try again
                log.error(
                    "relay %d could not be started: %s: %s; trying again in %.2g s",
                    member.index,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_S[1])
                continue
            try:
                port = await self._started(member)
                if port is not None:
                    log.info(
                        "relay %d (pid %s) listening on port %d", member.index, member.pid, port
                    )
                    self.listening.add(member.index)
                    self.on_listening()
                    if len(self.listening) == len(self.members):
                        self._all_listened.set()
            except TimeoutError:
                log.error("relay %d did not start within %.0f s", member.index, START_TIMEOUT_S)
                member.kill()
            except (EOFError, OSError):
                pass  # it exited before reporting; exited() says how
            code = await self._watch(member)
            recycled = member.index in self._recycling
            self._recycling.discard(member.index)
            self.listening.discard(member.index)
            self.on_listening()
            ran_s = time.monotonic() - member.started_at
            if recycled:  # on purpose: back at once, and no restart counted
                log.info(
                    "relay %d recycled (exit code %s after %.0f s); starting it again",
                    member.index,
                    code,
                    ran_s,
                )
                delay = BACKOFF_S[0]
                continue
            if ran_s >= STABLE_AFTER_S:
                delay = BACKOFF_S[0]
            self.restarts[member.index] += 1
            log.warning(
                "relay %d exited with code %s after %.1f s; restarting in %.1f s",
                member.index,
                code,
                ran_s,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _started(self, member: RelayProcess) -> int | None:
        """The port ``member`` reports (TimeoutError after START_TIMEOUT_S: interpreter start,
        imports). Once it has said Hello to the hub it is pinged as a running relay is: one
        silent for relay_hang_s, twice in a row, hangs before it listens and is killed (None)
        instead of holding its start for the whole START_TIMEOUT_S."""
        report = asyncio.ensure_future(member.reported(START_TIMEOUT_S))
        hang_s = self._config.relay_hang_s
        over = 0
        try:
            while not report.done():
                await asyncio.wait({report}, timeout=PING_EVERY_S)
                if report.done() or self._ping is None:
                    continue
                silent = self._ping(member.index)  # (None until it has said Hello)
                over = over + 1 if silent is not None and silent > hang_s else 0
                if over >= 2:  # (twice: as in _watch)
                    self.hangs[member.index] += 1
                    member.kill(
                        f"(pid {member.pid}) said Hello to the hub but has answered nothing for "
                        f"{silent:.1f} s without reporting its port (relay_hang_s {hang_s:g}): "
                        "it hangs while starting"
                    )
                    return None
            return report.result()
        finally:
            if not report.done():
                report.cancel()
                await asyncio.gather(report, return_exceptions=True)

    async def _watch(self, member: RelayProcess) -> int:
        """Until ``member`` exits (its exit code), ping it every PING_EVERY_S and kill it once
        it has been silent for relay_hang_s: a stopped or deadlocked relay keeps its share of
        the port, and every connection the kernel hands it would wait in vain."""
        exited = asyncio.ensure_future(member.exited())
        hang_s = self._config.relay_hang_s
        over = 0  # checks in a row that found it silent too long
        stop_by = 0.0  # once recycled: when it must have finished its calls
        try:
            while not exited.done():
                await asyncio.wait({exited}, timeout=PING_EVERY_S)
                if exited.done():
                    continue
                if stop_by:
                    if time.monotonic() > stop_by:
                        member.kill(f"(pid {member.pid}) recycled, did not stop in time")
                        await exited
                    continue
                if self._recycle(member):
                    stop_by = time.monotonic() + self._stop_within_s()
                    continue
                if self._ping is None:
                    continue
                silent = self._ping(member.index)
                over = over + 1 if silent is not None and silent > hang_s else 0
                # Twice in a row: after a stall of this loop itself, the first check may come
                # before the relay's answers, already waiting in the socket, are read.
                if over >= 2:
                    self.hangs[member.index] += 1
                    member.kill(
                        f"(pid {member.pid}) has answered nothing for {silent:.1f} s "
                        f"(relay_hang_s {hang_s:g}): it hangs"
                    )
                    await exited
            return exited.result()
        finally:
            if not exited.done():
                exited.cancel()

    def _stop_within_s(self) -> float:
        """How long a recycled relay may take to exit before it is killed."""
        within = self._config.grace_period_s + STOP_MARGIN_S
        if self._config.max_connection_age_s:
            within += drain_limit_s(self._config.max_connection_age_s)
        return within

    def _recycle(self, member: RelayProcess) -> bool:
        """Recycle ``member`` if its memory is over relay_max_memory_mib, it has run
        RECYCLE_MIN_AGE_S, and another relay listens meanwhile (one relay at a time). With a
        max_connection_age_s it is drained (it stops listening, its clients move to the
        other relays as their connections age, then it stops); without, SIGTERM, and it finishes
        its calls within the grace period. Its keeper starts it again."""
        limit = self._config.relay_max_memory_mib
        if (
            not limit
            or member.pid is None
            or time.monotonic() - member.started_at < RECYCLE_MIN_AGE_S
            or member.index not in self.listening
            or not self.listening - self._recycling - {member.index}
        ):
            return False
        used = self._memory(member.pid)
        if used is None or used <= limit:
            return False
        age = self._config.max_connection_age_s
        log.warning(
            "relay %d (pid %s) holds %.0f MiB of anonymous memory, over relay_max_memory_mib "
            "(%d): recycling it; %s, then it starts again (grpcio keeps a few hundred bytes of "
            "every call cancelled or past its deadline, grpc/grpc#43360)",
            member.index,
            member.pid,
            used,
            limit,
            f"it stops listening and its clients move to the other relays as their connections "
            f"reach max_connection_age_s ({age:g} s)"
            if age
            else "it finishes its calls while the others take new connections",
        )
        self._recycling.add(member.index)
        self.recycles[member.index] += 1
        if age:
            member.drain()
            self.listening.discard(member.index)  # (it has stopped taking connections)
            self.on_listening()
        else:
            member.terminate()
        return True


class RelayPort:
    """What ``--frontends N`` adds to the serving process: the hub that answers relayed calls
    (on a socket in a private folder) and the N relay processes on the gRPC port."""

    def __init__(self, config: ServerConfig, frontend: GrpcFrontend, registry: Any) -> None:
        self._config = config
        self._frontend = frontend
        self._registry = registry
        self._folder: Path | None = None
        self._hub: RelayHub | None = None
        self._relays: Relays | None = None

    async def start(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="warmserve-"))
        frontend, config = self._frontend, self._config
        hub = RelayHub(frontend.servicer, frontend.health, self._folder, config.max_message_bytes)
        relays = Relays(config, hub.path, hub.rings, hub.ping)
        try:
            await hub.start()
            relays.start()
        except BaseException:
            await hub.stop()
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        self._hub, self._relays = hub, relays
        # ready only while one relay at least takes calls on the port (one restarting is fine)
        frontend.gate.require(lambda: bool(relays.listening))
        relays.on_listening = frontend.gate.changed
        self._registry.register(
            RelayCollector(
                hub.calls, relays.restarts, hub.ring_calls, relays.hangs, relays.recycles
            )
        )

    async def wait_listening(self) -> None:
        if self._relays is not None:
            await self._relays.wait_listening()

    @property
    def port(self) -> int:
        """The gRPC port the relays serve."""
        return self._relays.port if self._relays is not None else 0

    async def stop(
        self, grace_s: float, drain_s: float = 0.0, hurry: asyncio.Event | None = None
    ) -> None:
        """The relays first (their calls in flight finish through the hub), then the hub.
        ``drain_s``, ``hurry``: as Relays.stop."""
        if self._relays is not None:
            await self._relays.stop(grace_s, drain_s, hurry)
        if self._hub is not None:
            await self._hub.stop()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def relay_main(
    index: int,
    hub_path: str,
    address: str,
    max_message_bytes: int,
    grace_s: float,
    log_level: str,
    inflight_bytes: int,
    connection_age_s: float,
    drain_s: float,
    leave_s: float,
    ring: tuple[int, int, InheritedFd] | None,
    conn: Connection,
) -> None:
    """Entry point of a relay process (spawned). ``ring``: its slots and memory file."""
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the serving process, which decides
    for drain_signal in (signal.SIGUSR1, signal.SIGUSR2):  # (handled once it listens)
        signal.signal(drain_signal, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s %(levelname)s relay-{index} %(name)s: %(message)s",
    )
    from serve.frontend import grpc_logs

    grpc_logs.install()
    import uvloop

    from serve.frontend.admission import InflightBudget
    from serve.frontend.relay import run_relay
    from serve.memory import keep_large_buffers_in_heap

    keep_large_buffers_in_heap()
    relay_ring = None
    if ring is not None:
        slots, slot_bytes, inherited = ring
        relay_ring = RelayRing(inherited.fd, slots, slot_bytes)
        os.close(inherited.fd)  # the mapping stays

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(
            run_relay(
                index,
                hub_path,
                address,
                max_message_bytes,
                grace_s,
                conn,
                relay_ring,
                InflightBudget(inflight_bytes),
                connection_age_s,
                drain_s,
                leave_s,
            )
        )
    sys.exit(code)
