"""Alternated rounds: servers side by side take turns, round after round, and each figure is the
median over the rounds (a hook before each round may start them afresh: compare.SideBySide).

One measurement of a few seconds per server, one server after the other, is at the mercy of
whatever else the machine does at that moment: on the 2-vCPU dev VM the c=1 ratio to the floor
moved between 1.17 and 1.59 from one quick run to the next. Servers measured in turn see the
same machine, and the median with its spread (kept per round) is what a ratio should rest on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MEDIAN_KEYS = (
    "throughput",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "server_cpu_us_per_call",
    "loop_us_per_call",  # (benchmarks.ab measures it; the rows of others lack it)
)

FLAG_KEYS = ("p99_few_samples", "generator_behind")  # set in the combined row if in any round

Row = dict[str, Any]


def median_row(rows: Sequence[Row]) -> Row:
    """One row from the same load level's rows of several rounds: the median of each figure in
    MEDIAN_KEYS that the rows have (the values per round under "rounds"), the worst max, the
    sum of counts and errors, each flag of FLAG_KEYS raised if any round raised it, and every
    latency (for CDFs)."""
    if not rows:
        raise ValueError("no rounds to combine")
    out = dict(rows[0])
    keys = [key for key in MEDIAN_KEYS if key in rows[0]]
    for key in keys:
        out[key] = float(np.median([row[key] for row in rows]))
    answered = [row["max_ms"] for row in rows if not math.isnan(row["max_ms"])]
    out["max_ms"] = max(answered, default=math.nan)  # (NaN: no call answered in any round)
    for key in FLAG_KEYS:
        if key in rows[0]:
            out[key] = any(row[key] for row in rows)
    for key in ("count", "errors", "seconds", "completed_in_window"):
        if key in rows[0]:
            out[key] = sum(row[key] for row in rows)
    out["latencies_ms"] = [v for row in rows for v in row.get("latencies_ms", [])]
    out["rounds"] = {key: [row[key] for row in rows] for key in keys}
    return out


def alternate(
    names: Sequence[str],
    levels: Sequence[int],
    rounds: int,
    measure: Callable[[str, int], Row],
    before_round: Callable[[int], None] | None = None,
) -> dict[str, list[Row]]:
    """``measure(name, level)`` for every server and level, ``rounds`` times; who goes first
    rotates from round to round. Per server, one median row per level. ``before_round(index)``
    runs before each round (to start the servers afresh, say)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    samples: dict[str, dict[int, list[Row]]] = {n: {c: [] for c in levels} for n in names}
    for index in range(rounds):
        if before_round is not None:
            before_round(index)
        shift = index % len(names)
        for name in [*names[shift:], *names[:shift]]:
            for level in levels:
                samples[name][level].append(measure(name, level))
    return {name: [median_row(samples[name][c]) for c in levels] for name in names}


def paired_ratios(numerator: Row, denominator: Row, key: str) -> list[float]:
    """The ratio of ``key`` round by round (the same round of two servers ran back to back);
    NaN for a round whose denominator is 0 (no call answered)."""
    top, bottom = numerator["rounds"][key], denominator["rounds"][key]
    return [a / b if b else math.nan for a, b in zip(top, bottom, strict=True)]


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of what ``values`` sample (ratios round by
    round): the narrowest pair of order statistics, the j-th smallest and the j-th largest, that
    holds the median with at least ``confidence`` (the rank of the median among n draws is
    binomial(n, 1/2)). NaN values (rounds without answers) are left out. (NaN, NaN) when too few
    rounds remain for that confidence: 6 at least for 95 %. An interval that holds 1.0 means the
    rounds do not tell the two sides apart at that confidence."""
    ordered = sorted(v for v in values if not math.isnan(v))
    n = len(ordered)

    def coverage(j: int) -> float:  # of [j-th smallest, j-th largest]
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2.0**n

    best = 0
    for j in range(1, (n + 1) // 2 + 1):
        if coverage(j) < confidence:
            break
        best = j
    if best == 0:
        return math.nan, math.nan
    return ordered[best - 1], ordered[n - best]
