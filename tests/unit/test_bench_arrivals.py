"""The open loop's arrival clock: it never wakes before the arrival, whether it waits on a
timerfd (Linux) or on the event loop's own timer (the fallback), under uvloop and asyncio's
default loop; and it holds nothing open once closed."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time

import pytest
import uvloop

from benchmarks import arrivals
from benchmarks.arrivals import ArrivalClock

TIMEOUT_S = 10.0  # a clock that never fires fails the test instead of hanging it


async def _wake_ups(count: int, rate: float) -> tuple[bool, list[float]]:
    """Wait for ``count`` Poisson arrivals at ``rate``; how early or late each wake-up was."""
    rng = random.Random(1)
    offsets: list[float] = []
    with ArrivalClock() as clock:
        arrival = time.perf_counter() + rng.expovariate(rate)
        for _ in range(count):
            await asyncio.wait_for(clock.until(arrival), TIMEOUT_S)
            offsets.append(time.perf_counter() - arrival)
            arrival += rng.expovariate(rate)
        return clock.precise, offsets


@pytest.mark.parametrize("runner", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_the_clock_never_wakes_before_the_arrival(runner):
    precise, offsets = runner(_wake_ups(200, 2000.0))
    assert precise is sys.platform.startswith("linux")
    assert len(offsets) == 200 and min(offsets) >= 0


def test_without_timerfd_the_loops_timer_is_used_and_never_wakes_early(monkeypatch):
    monkeypatch.setattr(arrivals, "_libc", lambda: None)
    precise, offsets = uvloop.run(_wake_ups(100, 2000.0))
    assert precise is False
    assert len(offsets) == 100 and min(offsets) >= 0


def test_an_arrival_already_past_returns_at_once_without_arming_the_timer():
    async def main() -> float:
        with ArrivalClock() as clock:
            started = time.perf_counter()
            await asyncio.wait_for(clock.until(started - 1.0), TIMEOUT_S)
            return time.perf_counter() - started

    assert uvloop.run(main()) < TIMEOUT_S


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
def test_two_waiters_at_once_are_refused_and_a_closed_clock_holds_no_fd():
    async def main() -> int:
        with ArrivalClock() as clock:
            fd = clock._fd
            first = asyncio.create_task(clock.until(time.perf_counter() + 0.05))
            await asyncio.sleep(0)  # (the first is waiting on the timer)
            with pytest.raises(RuntimeError, match="one waiter at a time"):
                await clock.until(time.perf_counter() + 0.05)
            await asyncio.wait_for(first, TIMEOUT_S)
        return fd

    fd = uvloop.run(main())
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the clock
