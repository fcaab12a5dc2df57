"""The soak tool's pure parts: the growth fit against calls, the steady-growth verdict, the
summary of statuses (benchmarks/soak.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.soak import (
    Sample,
    Series,
    failed_good_calls,
    format_report,
    growth,
    growth_table,
    linear_fit,
    short_deadline_status,
)


def series(values: list[float], figure: str = "rss_kb", calls_step: int = 10_000) -> Series:
    samples = [Sample(5.0 * i, calls_step * i, {figure: v}) for i, v in enumerate(values)]
    return Series(pid=42, role="serving", samples=samples)


def test_linear_fit_recovers_a_line() -> None:
    slope, intercept, r2 = linear_fit([0, 1, 2, 3], [1, 3, 5, 7])
    assert slope == pytest.approx(2.0)
    assert intercept == pytest.approx(1.0)
    assert r2 == pytest.approx(1.0)


def test_linear_fit_of_a_flat_series_or_a_single_x() -> None:
    assert linear_fit([0, 1, 2], [5, 5, 5]) == (pytest.approx(0.0), pytest.approx(5.0), 0.0)
    assert linear_fit([3, 3], [1, 2])[0] == 0.0


def test_growth_per_100k_calls_leaves_out_the_warm_up() -> None:
    # a jump during the warm-up (first 10 s), then 1 kB per 10k calls
    values = [100.0, 5000.0, 5000.0, 5001.0, 5002.0, 5003.0, 5004.0]
    fit = growth(series(values).samples, "rss_kb", warm_up_s=10.0)
    assert fit is not None
    assert fit.per_100k == pytest.approx(10.0)
    assert fit.change == pytest.approx(4.0)
    assert (fit.first, fit.last, fit.points) == (5000.0, 5004.0, 5)


def test_growth_needs_three_samples_after_the_warm_up() -> None:
    assert growth(series([1.0, 2.0, 3.0]).samples, "rss_kb", warm_up_s=5.0) is None


def test_steady_growth_is_flagged_and_noise_is_not() -> None:
    leaking = series([10_000.0 + 1024 * i for i in range(10)])  # 1 MiB per sample
    noisy = series([10_000.0 + (3000 if i % 2 else 0) for i in range(10)])  # 3 MB swings
    small = series([10_000.0 + 100 * i for i in range(10)])  # a line, under 2 MiB in all
    fds = series([30.0 + i for i in range(10)], figure="fds")
    rows = growth_table([leaking, noisy, small, fds], warm_up_s=0.0)
    grows = {(row["figure"], row["first"], row["last"]): row["grows"] for row in rows}
    assert grows == {
        ("rss_kb", 10_000.0, 10_000.0 + 9 * 1024): True,
        ("rss_kb", 10_000.0, 13_000.0): False,
        ("rss_kb", 10_000.0, 10_900.0): False,
        ("fds", 30.0, 39.0): True,
    }


def test_only_good_calls_that_were_not_ok_count_as_failures() -> None:
    statuses = Counter(
        {
            ("unary", "OK"): 100,
            ("unary", "UNAVAILABLE"): 2,
            ("stream", "OK"): 50,
            ("cancelled", "CANCELLED"): 7,
            ("short_deadline", "DEADLINE_EXCEEDED"): 9,
            ("bad_model", "NOT_FOUND"): 3,
        }
    )
    assert failed_good_calls(statuses) == {"unary/UNAVAILABLE": 2}
    report = format_report(growth_table([series([1.0, 2.0, 3.0])], 0.0), statuses)
    assert "good calls not OK: {'unary/UNAVAILABLE': 2}" in report
    assert "serving" in report


def test_a_short_deadline_call_ended_by_a_connection_age_goaway_is_expected_and_counted_apart():
    goaway = "Stream removed (Socket closed (GOAWAY received; Error code: 0; Debug Text: max_age))"
    assert short_deadline_status("UNAVAILABLE", goaway) == ("UNAVAILABLE_AT_GOAWAY", True)
    assert short_deadline_status("DEADLINE_EXCEEDED", "Deadline Exceeded") == (
        "DEADLINE_EXCEEDED",
        True,
    )
    # any other UNAVAILABLE (a reset, a refused connection) is still a finding
    reset = "failed to connect to all addresses; last error: UNAVAILABLE: Connection reset"
    assert short_deadline_status("UNAVAILABLE", reset) == ("UNAVAILABLE", False)
    assert short_deadline_status("INTERNAL", goaway) == ("INTERNAL", False)
