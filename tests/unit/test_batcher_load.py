"""How the batcher judges its event loop saturated (LoopLoad): by the loop thread's CPU time, and
by the time it waited, runnable, for a CPU (Linux's schedstat), fed here by a fake counter."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from serve.batching import batcher as batcher_module
from serve.batching.batcher import LoopLoad, run_queue_wait_ns
from serve.cpus import ThrottleWatch

WINDOW = batcher_module.LOAD_WINDOW_S


class WaitCounter:
    """A fake run-queue counter: each read returns the next of ``values`` (ns)."""

    def __init__(self, *values: int | None) -> None:
        self.values = list(values)
        self.reads = 0

    def __call__(self) -> int | None:
        self.reads += 1
        return self.values.pop(0)


class Windows:
    """Samples ``load`` at the ends of successive windows of 2 × LOAD_WINDOW_S from its start
    (in the future: the samples take the window's end as their ``now``; the thread does next
    to nothing meanwhile, so its CPU share stays near 0). ``rates``: the requests per second
    that came in each window, in turn (none counted once they run out)."""

    def __init__(
        self, load: LoopLoad, rates: list[float] | None = None, few_callers: bool = False
    ) -> None:
        self.load = load
        self.end = time.monotonic()
        self.rates = list(rates or [])
        self.requests = 0
        self.few_callers = few_callers

    def __call__(self, count: int = 1) -> None:
        for _ in range(count):
            self.end += 2 * WINDOW
            self.requests += round(2 * WINDOW * (self.rates.pop(0) if self.rates else 0))
            self.load.sample(self.end, self.requests, self.few_callers)


def test_a_loop_that_waits_for_a_cpu_most_of_the_time_is_saturated_though_its_cpu_is_low():
    waited = int(2 * WINDOW * 0.95 * 1e9)  # 95 % of the next window spent waiting for a CPU
    load = LoopLoad(WaitCounter(10**9, 10**9 + waited))
    windows = Windows(load)
    windows()  # the first window only reads the counter
    assert not load.saturated
    windows()
    assert load.busy < batcher_module.HOLD_LOAD  # its own CPU time would never hold
    assert load.pressed >= 0.95 and load.pressed >= batcher_module.HOLD_PRESSED
    assert load.saturated


def test_a_loop_that_seldom_waits_for_a_cpu_is_not_saturated():
    waited = int(2 * WINDOW * 0.2 * 1e9)
    load = LoopLoad(WaitCounter(0, waited, 2 * waited))
    Windows(load)(3)
    assert 0.2 <= load.pressed < batcher_module.HOLD_PRESSED
    assert not load.saturated


def test_where_the_kernel_does_not_say_pressed_is_the_cpu_time_and_the_counter_is_not_read_again():
    counter = WaitCounter(None, 10**12)
    load = LoopLoad(counter)
    Windows(load)(3)
    assert counter.reads == 1
    assert load.pressed == load.busy
    assert not load.saturated


def _saturation(
    fractions: list[float], rates: list[float], few_callers: bool = False
) -> list[bool]:
    """Whether the loop was saturated after each window in which it waited ``fractions`` of
    its time for a CPU while ``rates`` requests per second came (from ``few_callers``: the
    batcher's holds found them to be a few closed-loop callers)."""
    window_ns = 2 * WINDOW * 1e9
    counts = [10**9]
    for fraction in fractions:  # each window waits this fraction of its time for a CPU
        counts.append(counts[-1] + int(window_ns * fraction))
    load = LoopLoad(WaitCounter(*counts))
    windows = Windows(load, [0.0, *rates], few_callers)
    windows()  # (the first window only reads the counter)
    seen = []
    for _ in fractions:
        windows()
        assert load.busy < batcher_module.HOLD_LOAD - 0.3  # (decided by the wait alone)
        seen.append(load.saturated)
    return seen


def test_once_saturated_a_loop_stays_so_until_clearly_below_the_lines():
    """Holding lowers the load it answers: a loop that holds dips under the lines every few
    windows. Once requests come more slowly than when it saturated, it stops holding only
    HOLD_HYSTERESIS below them, and starts again only on them."""
    line, margin = batcher_module.HOLD_PRESSED, batcher_module.HOLD_HYSTERESIS
    fractions = [0.95, line - margin / 2, line - 1.5 * margin, line - margin / 2, 0.95]
    rates = [2000, 1000, 1000, 1000, 1000]
    assert _saturation(fractions, rates) == [True, True, False, False, True]


def test_a_holding_loop_whose_requests_come_as_fast_as_ever_stays_saturated_further_below():
    """Holding lowers the load of a request, not the rate requests come at: while they come at
    HOLD_RATE_KEPT of the rate that saturated the loop, it holds down to HOLD_HYSTERESIS_KEPT
    below the lines (at 80 % of the dev VM's capacity, an open loop's holding loop sat between
    the two margins half of the time)."""
    line, kept = batcher_module.HOLD_PRESSED, batcher_module.HOLD_HYSTERESIS_KEPT
    assert kept > batcher_module.HOLD_HYSTERESIS and batcher_module.HOLD_RATE_KEPT == 0.9
    between, under = line - kept + 0.05, line - kept - 0.05
    fractions = [0.95, between, between, under, 0.95, between, between, between]
    rates = [2000, 2000, 1900, 2000, 1000, 950, 1200, 850]
    #         saturates at 2,000/s; kept ...; under even the wide margin: leaves;
    #         saturates at 1,000/s; kept at 950 and 1,200/s; at 850/s, under 0.9 × 1,000: leaves
    expected = [True, True, True, False, True, True, True, False]
    assert _saturation(fractions, rates) == expected


def test_a_counter_that_goes_backwards_adds_no_wait():
    load = LoopLoad(WaitCounter(10**9, 0))
    Windows(load)(2)
    assert load.pressed == load.busy


def test_no_sample_before_a_window_has_passed():
    counter = WaitCounter(0)
    load = LoopLoad(counter)
    load.sample(time.monotonic())  # (a window is LOAD_WINDOW_S: not over yet)
    assert counter.reads == 0 and not load.saturated


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's schedstat")
def test_the_kernel_counter_reads_on_any_thread_and_never_falls():
    first = run_queue_wait_ns()
    if first is None:
        pytest.skip("this kernel keeps no schedstat")
    assert first >= 0
    assert run_queue_wait_ns() >= first
    seen: list[int | None] = []
    thread = threading.Thread(target=lambda: seen.append(run_queue_wait_ns()))
    thread.start()
    thread.join(10)
    assert seen and seen[0] is not None and seen[0] >= 0


def quiet() -> WaitCounter:
    """A run-queue counter that shows no wait."""
    return WaitCounter(*([0] * 64))


def test_a_process_its_cpu_limit_stopped_is_saturated_for_a_while_though_its_loop_is_idle():
    throttled = WaitCounter(5, 5, 6, *([6] * 20))  # one more throttled period in window 2
    load = LoopLoad(quiet(), throttle=ThrottleWatch(throttled))
    windows = Windows(load)
    windows()
    assert not load.throttled and not load.saturated  # (no new period: only the count)
    windows()
    assert load.busy < batcher_module.HOLD_LOAD and load.pressed < batcher_module.HOLD_PRESSED
    assert load.throttled and load.saturated
    memory_windows = round(batcher_module.THROTTLE_MEMORY_S / (2 * WINDOW))
    windows(memory_windows - 1)  # no more throttling: still within THROTTLE_MEMORY_S
    assert load.saturated
    windows(2)
    assert not load.throttled and not load.saturated


def test_a_limit_that_never_stops_the_process_is_not_saturation():
    load = LoopLoad(quiet(), throttle=ThrottleWatch(WaitCounter(*([3] * 10))))
    Windows(load)(5)
    assert not load.throttled and not load.saturated


def test_a_throttle_count_that_cannot_be_read_any_more_is_not_read_again():
    throttled = WaitCounter(1, None, 9)
    load = LoopLoad(quiet(), throttle=ThrottleWatch(throttled))
    Windows(load)(3)
    assert throttled.reads == 2  # at the start, then the None: never again
    assert not load.saturated


def test_the_batcher_watches_the_process_cpu_limit(monkeypatch):
    counter = WaitCounter(*([0] * 8))
    watch = ThrottleWatch(counter)
    monkeypatch.setattr(batcher_module, "throttle_watch", lambda: watch)
    batcher = batcher_module.DynamicBatcher(
        "m", executor=None, max_batch_size=8, max_queue_delay_us=0, max_queue_size=8
    )  # type: ignore[arg-type]
    assert batcher._load._throttle is watch
    assert counter.reads == 1  # the count the first window starts from


def test_a_few_closed_loop_callers_get_the_plain_margin_however_fast_they_call():
    """A few closed-loop callers call again only once answered: every hold slows them, so their
    rate says nothing of the load without holds (4 callers on the dev VM took 6 % fewer calls/s
    with the wider margin)."""
    line, kept = batcher_module.HOLD_PRESSED, batcher_module.HOLD_HYSTERESIS_KEPT
    between = line - kept + 0.05
    fractions = [0.95, between, between]
    assert _saturation(fractions, [2000, 2000, 2000]) == [True, True, True]
    assert _saturation(fractions, [2000, 2000, 2000], few_callers=True) == [True, False, False]


def test_the_batcher_samples_its_load_with_its_request_count_and_what_its_holds_found():
    import asyncio

    import numpy as np

    from tests.unit.test_batcher import FakePool, make

    class Recorder:
        saturated = False

        def __init__(self) -> None:
            self.calls: list[tuple[int, bool]] = []

        def sample(self, now: float, requests: int = 0, few_callers: bool = False) -> None:
            self.calls.append((requests, few_callers))

    async def main() -> list[tuple[int, bool]]:
        batcher = make(FakePool(slots=64))
        batcher.start()
        recorder = Recorder()
        batcher._load = recorder  # type: ignore[assignment]
        x = np.ones((1, 1), np.float32)
        for _ in range(32):
            await batcher.submit([x], 1, None)
        batcher._hold_ceiling = 3  # the holds found 3 closed-loop callers
        for _ in range(32):
            await batcher.submit([x], 1, None)
        await batcher.stop()
        return recorder.calls

    assert asyncio.run(main()) == [(32, False), (64, True)]
