"""Alternated benchmark rounds: who goes first rotates, each figure is the median, and the
median ratio gets a distribution-free 95 % interval."""

from __future__ import annotations

import math
import random

import pytest

from benchmarks.rounds import alternate, median_interval, median_row, paired_ratios


def row(level: int, value: float, **extra: float) -> dict:
    base = {"mode": "closed", "level": level, "count": 10, "errors": 0, "seconds": 1.0}
    figures = {k: value for k in ("throughput", "p50_ms", "p95_ms", "p99_ms")}
    return {**base, **figures, "server_cpu_us_per_call": value, "max_ms": value, **extra}


def test_each_figure_is_the_median_over_rounds_and_the_rounds_are_kept():
    combined = median_row([row(1, 3.0), row(1, 1.0, max_ms=9.0), row(1, 2.0, errors=2)])
    assert combined["p50_ms"] == 2.0 and combined["throughput"] == 2.0
    assert combined["max_ms"] == 9.0  # the worst, not the median
    assert (combined["count"], combined["errors"], combined["seconds"]) == (30, 2, 3.0)
    assert combined["rounds"]["p50_ms"] == [3.0, 1.0, 2.0]
    assert combined["level"] == 1


def test_rounds_alternate_servers_and_rotate_who_goes_first():
    calls: list[tuple[str, int]] = []

    def measure(name: str, level: int) -> dict:
        calls.append((name, level))
        return row(level, float(len(calls)))

    out = alternate(["a", "b", "c"], [1, 16], 3, measure)
    firsts = [calls[i][0] for i in (0, 6, 12)]
    assert firsts == ["a", "b", "c"]
    assert calls[:6] == [("a", 1), ("a", 16), ("b", 1), ("b", 16), ("c", 1), ("c", 16)]
    assert [r["level"] for r in out["b"]] == [1, 16]
    assert out["a"][0]["rounds"]["p50_ms"] == [1.0, 11.0, 15.0]  # a's c=1 in each round


def test_each_round_starts_with_its_hook():
    events: list[str] = []

    def measure(name: str, level: int) -> dict:
        events.append(f"{name}{level}")
        return row(level, 1.0)

    alternate(["a", "b"], [1], 3, measure, before_round=lambda i: events.append(f"round{i}"))
    assert events == ["round0", "a1", "b1", "round1", "b1", "a1", "round2", "a1", "b1"]


def test_ratios_pair_the_same_round_of_two_servers():
    a = median_row([row(1, 2.0), row(1, 6.0)])
    b = median_row([row(1, 1.0), row(1, 4.0)])
    assert paired_ratios(a, b, "p50_ms") == [2.0, 1.5]


def test_no_rounds_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        alternate(["a"], [1], 0, lambda name, level: row(level, 1.0))
    with pytest.raises(ValueError):
        median_row([])


def test_the_median_interval_is_the_order_statistics_that_hold_it_at_95_percent():
    # n=10: the 2nd smallest and 2nd largest (97.9 %); the 3rd would hold it only 89.1 %
    assert median_interval([7, 1, 10, 3, 5, 2, 9, 4, 8, 6]) == (2, 9)
    # n=16: the 4th (97.9 %); n=6: only the extremes (96.9 %)
    assert median_interval(list(range(1, 17))) == (4, 13)
    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)


def test_the_median_interval_needs_six_rounds_and_leaves_out_rounds_without_answers():
    assert all(math.isnan(v) for v in median_interval([1.0, 2.0, 3.0, 4.0, 5.0]))  # 93.8 %
    assert median_interval([1.0, math.nan, 2.0, 3.0, 4.0, 5.0, 6.0]) == (1.0, 6.0)


def test_the_median_interval_holds_the_true_median_as_often_as_it_claims():
    """Over many samples from a known distribution, the interval misses its median at most
    about 5 % of the time (the order statistics' coverage is exact, not asymptotic)."""
    rng = random.Random(7)
    for n in (6, 10, 16):
        misses = 0
        for _ in range(4000):
            low, high = median_interval([rng.lognormvariate(0.0, 0.2) for _ in range(n)])
            misses += not low <= 1.0 <= high  # the lognormal's median is exp(0) = 1
        assert misses / 4000 < 0.05 + 0.015  # (3 binomial standard errors of slack)


def test_ab_says_whether_the_interval_tells_the_sides_apart():
    from benchmarks.ab import verdict

    assert verdict(0.95, 1.08).endswith("not told apart")
    assert verdict(1.02, 1.10).endswith("new higher")
    assert verdict(0.80, 0.97).endswith("new lower")
    assert verdict(math.nan, math.nan).startswith("too few rounds")
