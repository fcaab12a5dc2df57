"""The serving loop's spin while a few batches are out (WARMSERVE_LOOP_SPIN, an experiment)."""

from __future__ import annotations

import asyncio

import pytest

from serve.config import loop_spin_from_env
from serve.cpus import SpinPause, ThrottleWatch
from serve.pool.loop_spin import MOST_BATCHES, LoopSpin

NO_LIMIT = SpinPause(None, "test")


class _Handle:
    def __init__(self) -> None:
        self._pending: dict[int, object] = {}


def test_the_loop_spins_while_a_batch_is_out_and_stops_when_it_is_answered():
    async def main() -> tuple[int, int, bool]:
        spin, handle = LoopSpin(enabled=True, pause=NO_LIMIT), _Handle()
        handle._pending[1] = object()
        spin.busy(handle)
        while spin.turns < 50:  # the spin task turns the loop while nothing else runs
            await asyncio.sleep(0)
        del handle._pending[1]  # answered
        turns = spin.turns
        while spin._task is not None:
            await asyncio.sleep(0)
        return turns, spin.turns, spin._task is None

    turns, final, stopped = asyncio.run(main())
    assert turns >= 50 and stopped and final <= turns + 2


def test_with_many_batches_out_or_when_off_it_does_not_spin():
    async def main(enabled: bool, batches: int) -> int:
        spin, handle = LoopSpin(enabled=enabled, pause=NO_LIMIT), _Handle()
        handle._pending.update({i: object() for i in range(batches)})
        spin.busy(handle)
        for _ in range(20):
            await asyncio.sleep(0)
        return spin.turns

    assert asyncio.run(main(True, MOST_BATCHES + 1)) == 0
    assert asyncio.run(main(False, 1)) == 0


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("yes", True), ("0", False), ("", False)]
)
def test_the_environment_turns_it_on(monkeypatch, value, expected):
    monkeypatch.setenv("WARMSERVE_LOOP_SPIN", value)
    assert loop_spin_from_env() is expected


def test_batches_out_at_other_workers_keep_counting_after_a_spin_ends():
    # (a spin that ended forgot every worker: the next one counted only the last worker's
    # batches and spun with the loop busy)
    async def main() -> int:
        spin, a, b = LoopSpin(enabled=True, pause=NO_LIMIT), _Handle(), _Handle()
        a._pending.update({i: object() for i in range(MOST_BATCHES + 1)})  # worker A is busy
        spin.busy(a)
        for _ in range(5):
            await asyncio.sleep(0)  # too many out: the spin ends at once
        assert spin._task is None
        b._pending[0] = object()  # one more batch, to worker B
        spin.busy(b)
        for _ in range(20):
            await asyncio.sleep(0)
        return spin.turns

    assert asyncio.run(main()) == 0


def test_a_spin_ends_after_its_longest_time_though_the_batch_is_still_out(monkeypatch):
    import serve.pool.loop_spin as loop_spin

    monkeypatch.setattr(loop_spin, "LONGEST_S", 0.02)

    async def main() -> bool:
        spin, handle = LoopSpin(enabled=True, pause=NO_LIMIT), _Handle()
        handle._pending[1] = object()  # a long batch: never answered here
        spin.busy(handle)
        async with asyncio.timeout(10):
            while spin._task is not None:
                await asyncio.sleep(0.001)
        return bool(handle._pending)

    assert asyncio.run(main())  # the spin ended by itself, the batch still out


def test_it_does_not_spin_while_the_cpu_limit_stops_the_process_and_stops_spinning_when_it_does():
    """A spin under a CPU limit spends the quota the workers are short of."""
    periods, clock = [0], [100.0]
    pause = SpinPause(ThrottleWatch(lambda: periods[0]), "test", clock=lambda: clock[0])
    pause()  # (the first read only learns the count)

    async def main() -> tuple[int, int, int]:
        spin, handle = LoopSpin(enabled=True, pause=pause), _Handle()
        handle._pending[1] = object()
        periods[0], clock[0] = 2, 101.0  # the limit stopped the process
        spin.busy(handle)
        assert spin._task is None  # (not even a task started)
        for _ in range(20):
            await asyncio.sleep(0)
        paused_turns = spin.turns
        clock[0] = 101.0 + pause.memory_s + pause.check_s  # no stop since: spinning again
        spin.busy(handle)
        while spin.turns < 20:
            await asyncio.sleep(0)
        periods[0], clock[0] = 3, clock[0] + 2 * pause.check_s  # stopped again, mid-spin
        for _ in range(5):
            await asyncio.sleep(0)
        ended = spin._task is None
        return paused_turns, spin.turns, int(ended)

    paused_turns, turns, ended = asyncio.run(main())
    assert paused_turns == 0
    assert turns >= 20 and ended
    assert pause.pauses == 2
