"""Alternated benchmark rounds: who goes first rotates, and each figure is the median."""

from __future__ import annotations

import pytest

from benchmarks.rounds import alternate, median_row, paired_ratios


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


def test_ratios_pair_the_same_round_of_two_servers():
    a = median_row([row(1, 2.0), row(1, 6.0)])
    b = median_row([row(1, 1.0), row(1, 4.0)])
    assert paired_ratios(a, b, "p50_ms") == [2.0, 1.5]


def test_no_rounds_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        alternate(["a"], [1], 0, lambda name, level: row(level, 1.0))
    with pytest.raises(ValueError):
        median_row([])
