"""SIGTERM/SIGINT on the way to a stop (serve.app.StopSignals): the first stops, a second one
cuts the drain short, and the same signal delivered twice at once counts once."""

from __future__ import annotations

import logging
import signal

from serve.app import StopSignals


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_first_signal_stops_and_a_later_one_hurries(caplog):
    caplog.set_level(logging.INFO, "serve.app")
    clock = Clock()
    signals = StopSignals(clock)
    signals.received(signal.SIGTERM)
    assert signals.stop.is_set() and not signals.hurry.is_set()
    clock.now += StopSignals.REPEAT_WITHIN_S
    signals.received(signal.SIGINT)
    assert signals.hurry.is_set()
    assert "received SIGINT again: stopping without waiting for clients to move" in caplog.text


def test_the_same_signal_twice_at_once_counts_once(caplog):
    caplog.set_level(logging.INFO, "serve.app")
    clock = Clock()
    signals = StopSignals(clock)
    signals.received(signal.SIGTERM)
    clock.now += StopSignals.REPEAT_WITHIN_S / 2
    signals.received(signal.SIGTERM)  # (a wrapper forwarding it, and the process group)
    assert signals.stop.is_set() and not signals.hurry.is_set()
    assert "again" not in caplog.text


def test_a_signal_after_a_stop_for_another_reason_hurries_at_once():
    signals = StopSignals(Clock())
    signals.stop.set()  # (the warm-up failed)
    signals.received(signal.SIGTERM)
    assert signals.hurry.is_set()
