"""The serving process keeps its relays running: a relay that cannot be started is tried again
(no process: a stand-in relay)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

import serve.supervisor
from serve.config import ServerConfig
from serve.supervisor import Relays


class _Relay:
    """Cannot be started the first time (out of processes); listens the second."""

    index, pid, started_at = 0, 4242, 0.0

    def __init__(self) -> None:
        self.starts = 0
        self.gone = asyncio.Event()

    def start(self) -> None:
        self.starts += 1
        if self.starts == 1:
            raise OSError(11, "Resource temporarily unavailable")

    async def reported(self, timeout: float) -> int:
        return 8001

    async def exited(self) -> int:
        await self.gone.wait()
        return 0

    def kill(self) -> None:
        self.gone.set()


def test_a_relay_that_cannot_be_started_is_tried_again(monkeypatch, caplog, tmp_path: Path):
    monkeypatch.setattr(serve.supervisor, "BACKOFF_S", (0.01, 0.02))

    async def main() -> tuple[Relays, _Relay]:
        relays, relay = Relays(ServerConfig(frontends=1), tmp_path / "hub.sock"), _Relay()
        relays.members = [relay]  # type: ignore[list-item]
        keeper = asyncio.create_task(relays._keep(relay))  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(10):
                await relays.wait_listening()
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        return relays, relay

    relays, relay = asyncio.run(main())
    assert relay.starts == 2 and relays.listening == {0}
    assert "relay 0 could not be started: BlockingIOError" in caplog.text


def test_readiness_is_shut_while_no_relay_listens(monkeypatch, tmp_path: Path):
    from serve.frontend.gate import ReadinessGate

    monkeypatch.setattr(serve.supervisor, "BACKOFF_S", (30.0, 30.0))  # it stays down meanwhile

    async def main() -> list[bool]:
        relays, relay = Relays(ServerConfig(frontends=1), tmp_path / "hub.sock"), _Relay()
        relay.starts = 1  # (it starts at once)
        relays.members = [relay]  # type: ignore[list-item]
        gate, seen = ReadinessGate(), []
        gate.require(lambda: bool(relays.listening))  # as RelayPort wires it
        relays.on_listening = gate.changed
        gate.add_listener(lambda: seen.append(gate.open))
        gate.set(True)  # warmed up: open as far as the front end goes
        keeper = asyncio.create_task(relays._keep(relay))  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(10):
                await relays.wait_listening()
                relay.kill()  # the relay exits: nothing listens until it is back
                while relays.listening:
                    await asyncio.sleep(0)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        return seen

    assert asyncio.run(main()) == [False, True, False]  # opened, relay up, relay gone


class _HungRelay(_Relay):
    """Starts and listens at once; killed (with a reason) it exits."""

    def __init__(self) -> None:
        super().__init__()
        self.starts = 1  # (no failed first start)
        self.reasons: list[str] = []

    def kill(self, reason: str = "") -> None:  # type: ignore[override]
        self.reasons.append(reason)
        self.gone.set()


def _watch(monkeypatch, tmp_path: Path, silences: list[float | None]) -> tuple[Relays, _HungRelay]:
    """Watch one relay whose pings report ``silences`` in turn (then the last one, for good)
    until it exits or 100 checks have passed."""
    monkeypatch.setattr(serve.supervisor, "PING_EVERY_S", 0.001)
    checks = iter(range(100))

    def ping(index: int) -> float | None:
        assert index == 0
        n = next(checks, None)
        if n is None:
            relay.gone.set()  # (enough: end the watch)
            return 0.0
        return silences[min(n, len(silences) - 1)]

    relay = _HungRelay()
    relays = Relays(ServerConfig(frontends=1, relay_hang_s=2.0), tmp_path / "hub.sock", ping=ping)

    async def main() -> None:
        async with asyncio.timeout(10):
            await relays._watch(relay)  # type: ignore[arg-type]

    asyncio.run(main())
    return relays, relay


def test_a_relay_silent_past_relay_hang_s_twice_in_a_row_is_killed(monkeypatch, tmp_path: Path):
    relays, relay = _watch(monkeypatch, tmp_path, [0.0, 1.0, 2.5, 3.5])
    assert len(relay.reasons) == 1 and "has answered nothing for 3.5 s" in relay.reasons[0]
    assert relays.hangs == [1]


def test_one_late_answer_or_no_connection_yet_does_not_kill_it(monkeypatch, tmp_path: Path):
    # a stall of the serving loop itself: one check finds it silent, the next has its answer
    relays, relay = _watch(monkeypatch, tmp_path, [None, 0.0, 5.0, 0.0, 5.0, None, 0.0])
    assert relay.reasons == [] and relays.hangs == [0]


class _StartHungRelay(_HungRelay):
    """Its first start says Hello and then hangs before it reports its port (killed, its
    report fails as a dead process's pipe does); its second start listens."""

    async def reported(self, timeout: float) -> int:
        if self.starts == 1:
            await self.gone.wait()
            raise EOFError
        return 8001

    def start(self) -> None:
        self.starts += 1
        self.gone = asyncio.Event()


def test_a_relay_that_hangs_after_its_hello_is_killed_and_restarted_before_the_start_timeout(
    monkeypatch, caplog, tmp_path: Path
):
    monkeypatch.setattr(serve.supervisor, "PING_EVERY_S", 0.001)
    monkeypatch.setattr(serve.supervisor, "BACKOFF_S", (0.001, 0.002))
    relay = _StartHungRelay()
    relay.starts = 0
    silences = iter([None, 0.0, 1.0, 2.5, 3.5])  # no Hello yet, then ever longer silent

    def ping(index: int) -> float | None:
        if relay.starts > 1:
            return 0.0  # the new one answers
        return next(silences, 4.5)

    relays = Relays(ServerConfig(frontends=1, relay_hang_s=2.0), tmp_path / "hub.sock", ping=ping)
    relays.members = [relay]  # type: ignore[list-item]

    async def main() -> None:
        keeper = asyncio.create_task(relays._keep(relay))  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(10):  # far below START_TIMEOUT_S (60 s)
                await relays.wait_listening()
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    asyncio.run(main())
    assert relay.starts == 2 and relays.listening == {0}
    assert len(relay.reasons) == 1 and "without reporting its port" in relay.reasons[0]
    assert "answered nothing for 3.5 s" in relay.reasons[0]
    assert relays.hangs == [1] and relays.restarts == [1]


class _SlowRelay(_HungRelay):
    """Takes a while to listen (its loop runs: it answers pings meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.listens = asyncio.Event()

    async def reported(self, timeout: float) -> int:
        await self.listens.wait()
        return 8001


def test_a_relay_slow_to_start_but_answering_pings_is_not_killed(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(serve.supervisor, "PING_EVERY_S", 0.001)

    async def main() -> tuple[int | None, _SlowRelay, Relays]:
        relay, pings = _SlowRelay(), iter(range(50))

        def ping(index: int) -> float | None:
            if next(pings, None) is None:
                relay.listens.set()  # (it listens after 50 pings)
            return 0.0

        config = ServerConfig(frontends=1, relay_hang_s=2.0)
        relays = Relays(config, tmp_path / "hub.sock", ping=ping)
        async with asyncio.timeout(10):
            return await relays._started(relay), relay, relays  # type: ignore[arg-type]

    port, relay, relays = asyncio.run(main())
    assert port == 8001 and relay.reasons == [] and relays.hangs == [0]


# --- recycling a relay whose memory passed relay_max_memory_mib ------------------------------


class _Recyclable(_HungRelay):
    """Listening since long ago; SIGTERM (``terminate``) or SIGUSR1 (``drain``) ends it unless
    ``stubborn``."""

    def __init__(self, index: int, stubborn: bool = False) -> None:
        super().__init__()
        self.index, self.pid = index, 5000 + index
        self.stubborn = stubborn
        self.told: list[str] = []  # how it was asked to stop

    @property
    def terminated(self) -> int:
        return len(self.told)

    def terminate(self) -> None:
        self._stop("terminate")

    def drain(self) -> None:
        self._stop("drain")

    def leave(self) -> None:
        self._stop("leave")

    @property
    def alive(self) -> bool:
        return not self.gone.is_set()

    def _stop(self, how: str) -> None:
        self.told.append(how)
        if not self.stubborn:
            self.gone.set()


def _recycling(
    monkeypatch,
    tmp_path: Path,
    used_mib: dict[int, float],
    *,
    listening: set[int],
    frontends: int = 2,
    limit: int = 100,
    age_s: float = 1000.0,
    checks: int = 20,
    grace_s: float = 10.0,
    connection_age_s: float = 60.0,
) -> tuple[Relays, list[_Recyclable]]:
    """Watch relays 0..frontends-1 (each ``age_s`` old, using ``used_mib[index]``) for
    ``checks`` ticks each, or until they exit."""
    monkeypatch.setattr(serve.supervisor, "PING_EVERY_S", 0.001)
    monkeypatch.setattr(serve.supervisor, "STOP_MARGIN_S", 0.0)
    members = [_Recyclable(i) for i in range(frontends)]
    config = ServerConfig(
        frontends=frontends,
        relay_max_memory_mib=limit,
        grace_period_s=grace_s,
        max_connection_age_s=connection_age_s,
    )
    ticks = {m.index: 0 for m in members}

    def ping(index: int) -> float | None:
        ticks[index] += 1
        if ticks[index] >= checks:
            members[index].gone.set()  # (enough: end its watch)
        return 0.0

    def memory(pid: int) -> float | None:
        return used_mib.get(pid - 5000)

    relays = Relays(config, tmp_path / "hub.sock", ping=ping, memory=memory)
    relays.listening = set(listening)

    async def main() -> None:
        for member in members:
            member.started_at = time.monotonic() - age_s
        async with asyncio.timeout(10):
            await asyncio.gather(*(relays._watch(m) for m in members))  # type: ignore[arg-type]

    asyncio.run(main())
    return relays, members


def test_a_relay_over_its_memory_limit_is_recycled_while_another_listens(
    monkeypatch, caplog, tmp_path: Path
):
    relays, (big, small) = _recycling(monkeypatch, tmp_path, {0: 150.0, 1: 60.0}, listening={0, 1})
    assert (big.told, small.told) == (["drain"], [])
    assert relays.listening == {1}  # a draining relay takes no new connections
    assert relays.recycles == [1, 0] and relays.hangs == [0, 0]
    assert "relay 0 (pid 5000) holds 150 MiB of anonymous memory" in caplog.text
    assert "relay_max_memory_mib (100)" in caplog.text
    assert "reach max_connection_age_s (60 s)" in caplog.text


def test_without_a_connection_age_a_recycled_relay_is_stopped_without_draining(
    monkeypatch, tmp_path: Path
):
    # (its clients would never leave a draining relay: nothing sends them a GOAWAY)
    relays, (big, small) = _recycling(
        monkeypatch, tmp_path, {0: 150.0, 1: 60.0}, listening={0, 1}, connection_age_s=0
    )
    assert (big.told, small.told) == (["terminate"], [])
    assert relays.recycles == [1, 0]


def test_no_relay_is_recycled_without_another_listening_or_below_its_limit(
    monkeypatch, tmp_path: Path
):
    alone, members = _recycling(monkeypatch, tmp_path, {0: 150.0, 1: 150.0}, listening={0})
    assert [m.terminated for m in members] == [0, 0]  # 1 does not listen: 0 stays; 1 is not up
    under, members = _recycling(monkeypatch, tmp_path, {0: 99.0, 1: 100.0}, listening={0, 1})
    assert [m.terminated for m in members] == [0, 0]
    off, members = _recycling(monkeypatch, tmp_path, {0: 1e6, 1: 1e6}, listening={0, 1}, limit=0)
    assert [m.terminated for m in members] == [0, 0]
    unknown, members = _recycling(monkeypatch, tmp_path, {}, listening={0, 1})
    assert [m.terminated for m in members] == [0, 0]
    assert alone.recycles == under.recycles == off.recycles == unknown.recycles == [0, 0]


def test_a_young_relay_is_not_recycled(monkeypatch, tmp_path: Path):
    age = serve.supervisor.RECYCLE_MIN_AGE_S - 5
    relays, members = _recycling(
        monkeypatch, tmp_path, {0: 150.0, 1: 150.0}, listening={0, 1}, age_s=age
    )
    assert [m.terminated for m in members] == [0, 0] and relays.recycles == [0, 0]


def test_relays_over_the_limit_together_are_recycled_one_at_a_time(monkeypatch, tmp_path: Path):
    # Both pass the limit: the first recycled still counts as going, so the second waits (its
    # watch ends before the first is back, here: it is not recycled in this window).
    relays, members = _recycling(monkeypatch, tmp_path, {0: 150.0, 1: 150.0}, listening={0, 1})
    assert sorted(m.terminated for m in members) == [0, 1]
    assert sorted(relays.recycles) == [0, 1]


@pytest.mark.parametrize("connection_age_s", [0.0, 60.0])
def test_a_recycled_relay_is_killed_only_past_its_drain_and_grace_period(
    monkeypatch, tmp_path: Path, connection_age_s: float
):
    """No grace period: a relay that does not exit is killed at once, unless it drains, which
    gets it the connection age (+10 %, + a margin) first."""
    monkeypatch.setattr(serve.supervisor, "PING_EVERY_S", 0.001)
    monkeypatch.setattr(serve.supervisor, "STOP_MARGIN_S", 0.0)
    stubborn, other = _Recyclable(0, stubborn=True), _Recyclable(1)
    config = ServerConfig(
        frontends=2,
        relay_max_memory_mib=100,
        grace_period_s=0.0,
        max_connection_age_s=connection_age_s,
    )
    relays = Relays(config, tmp_path / "hub.sock", ping=lambda i: 0.0, memory=lambda pid: 500.0)
    relays.listening = {0, 1}

    async def main() -> None:
        stubborn.started_at = time.monotonic() - 1000
        watch = asyncio.create_task(relays._watch(stubborn))  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            if connection_age_s:  # (a kill would come within a tick or two: give it 50)
                while not stubborn.told:
                    await asyncio.sleep(0.001)
                await asyncio.sleep(50 * serve.supervisor.PING_EVERY_S)
                stubborn.gone.set()
            await watch

    asyncio.run(main())
    assert relays.recycles == [1, 0] and other.terminated == 0
    if connection_age_s:
        assert stubborn.told == ["drain"] and stubborn.reasons == []
    else:
        assert stubborn.told == ["terminate"]
        assert stubborn.reasons == ["(pid 5000) recycled, did not stop in time"]


def test_a_recycled_relay_is_started_again_at_once_and_not_counted_as_a_restart(
    monkeypatch, caplog, tmp_path: Path
):
    monkeypatch.setattr(serve.supervisor, "PING_EVERY_S", 0.001)
    monkeypatch.setattr(serve.supervisor, "BACKOFF_S", (30.0, 30.0))  # a restart would wait
    caplog.set_level(logging.INFO, "serve.supervisor")
    relay = _Recyclable(0)
    used = iter([500.0])  # over the limit once, then small

    def memory(pid: int) -> float | None:
        return next(used, 10.0)

    config = ServerConfig(frontends=2, relay_max_memory_mib=100)
    relays = Relays(config, tmp_path / "hub.sock", ping=lambda i: 0.0, memory=memory)
    relays.listening = {1}  # the other relay listens all along
    relays.members = [relay]  # type: ignore[list-item]
    starts: list[float] = []

    def start() -> None:  # (each start listens at once; the first one long ago)
        relay.starts += 1
        relay.gone = asyncio.Event()
        relay.started_at = time.monotonic() - (1000 if relay.starts == 2 else 0)
        starts.append(relay.started_at)

    relay.start = start  # type: ignore[method-assign]

    async def main() -> None:
        keeper = asyncio.create_task(relays._keep(relay))  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(10):
                while relay.starts < 3:
                    await asyncio.sleep(0.001)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    asyncio.run(main())
    assert relay.terminated == 1 and relays.recycles == [1, 0]
    assert relays.restarts == [0, 0]  # on purpose, not counted as a restart
    assert "relay 0 recycled (exit code 0" in caplog.text


def _stopping(
    monkeypatch,
    tmp_path: Path,
    members: list[_Recyclable],
    listening: set[int],
    drain_s: float,
    hurry: bool = False,
) -> None:
    """Relays.stop(grace 5 s, ``drain_s``) over stand-in relays; ``hurry``: set at once."""
    monkeypatch.setattr(serve.supervisor, "STOP_MARGIN_S", 0.0)
    relays = Relays(ServerConfig(frontends=len(members)), tmp_path / "hub.sock")
    relays.members = members  # type: ignore[assignment]
    relays.listening = set(listening)

    async def main() -> None:
        event = asyncio.Event()
        if hurry:
            event.set()
        async with asyncio.timeout(10):
            await relays.stop(5.0, drain_s, event)

    asyncio.run(main())


def test_on_stop_listening_relays_leave_first_and_one_not_yet_listening_is_stopped(
    monkeypatch, tmp_path: Path
):
    members = [_Recyclable(0), _Recyclable(1)]
    _stopping(monkeypatch, tmp_path, members, listening={0}, drain_s=60.0)
    assert members[0].told == ["leave"]  # (it left on its own: no SIGTERM after)
    assert members[1].told == ["terminate"]  # (starting: nothing to drain, and no handler yet)


def test_a_relay_whose_clients_stay_busy_is_stopped_after_the_drain_time(
    monkeypatch, tmp_path: Path
):
    busy = _Recyclable(0, stubborn=True)

    def terminate() -> None:  # (SIGTERM ends its drain and it stops)
        busy.told.append("terminate")
        busy.gone.set()

    busy.terminate = terminate  # type: ignore[method-assign]
    _stopping(monkeypatch, tmp_path, [busy], listening={0}, drain_s=0.05)
    assert busy.told == ["leave", "terminate"] and busy.reasons == []


def test_a_second_signal_ends_the_relays_drain_at_once(monkeypatch, tmp_path: Path):
    busy = _Recyclable(0, stubborn=True)

    def terminate() -> None:
        busy.told.append("terminate")
        busy.gone.set()

    busy.terminate = terminate  # type: ignore[method-assign]
    _stopping(monkeypatch, tmp_path, [busy], listening={0}, drain_s=3600.0, hurry=True)
    assert busy.told == ["leave", "terminate"] and busy.reasons == []  # (not 3600 s later)


def test_waiting_on_the_way_to_a_stop_logs_what_failed_and_does_not_raise(caplog):
    async def counting_connections() -> None:
        raise OSError(2, "No such file or directory: '/proc/self/net/tcp'")

    async def slow() -> None:
        await asyncio.sleep(3600)

    async def main() -> None:
        await serve.supervisor.wait_until(counting_connections(), 10, None)
        async with asyncio.timeout(10):  # (cut off at its limit, and cancelled: not an error)
            await serve.supervisor.wait_until(slow(), 0.01, None)

    asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, caplog.text
    message = errors[0].getMessage()
    assert message.endswith(
        "counting_connections failed: [Errno 2] No such file or directory: '/proc/self/net/tcp'"
    )
