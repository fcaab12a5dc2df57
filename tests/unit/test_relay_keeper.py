"""The serving process keeps its relays running: a relay that cannot be started is tried again
(no process: a stand-in relay)."""

from __future__ import annotations

import asyncio
from pathlib import Path

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
