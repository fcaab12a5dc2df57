"""How late an open loop's arrivals wake, with the event loop's timer against a timerfd
(benchmarks.arrivals.ArrivalClock): Poisson arrivals, nothing sent, the lag of each wake-up.

    PYTHONPATH=. .venv/bin/python benchmarks/results/cpu-2026-11-28-nineteenth/arrival_lag.py
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import uvloop

from benchmarks.arrivals import ArrivalClock


async def lags(rate: float, seconds: float, precise: bool) -> list[float]:
    rng = random.Random(0)
    out: list[float] = []
    with ArrivalClock() as clock:
        start = time.perf_counter()
        arrival = start + rng.expovariate(rate)
        while arrival < start + seconds:
            if precise:
                await clock.until(arrival)
            else:
                delay = arrival - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            out.append(time.perf_counter() - arrival)
            arrival += rng.expovariate(rate)
    return out


def main() -> None:
    for loop_name, runner in (("uvloop", uvloop.run), ("asyncio", asyncio.run)):
        for rate in (250, 1000, 4000):
            for precise in (False, True):
                values = np.asarray(runner(lags(rate, 2.0, precise))) * 1e6
                p50, p99 = np.percentile(values, (50, 99))
                how = "timerfd   " if precise else "loop timer"
                print(
                    f"{loop_name:8s} {rate:5d}/s {how}: wake-up lag p50 {p50:7.1f} µs, "
                    f"p99 {p99:7.1f} µs, max {values.max():7.1f} µs, "
                    f"early {int((values < 0).sum())}"
                )


if __name__ == "__main__":
    main()
