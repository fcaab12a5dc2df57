"""perf_analyzer's CSV report (its ``-f`` file), read by column name.

The report's first section has one header line and one row per load level, not in the order
they ran (2.51 sorts them by throughput); its columns differ between versions and servers (the
server-side ones only appear when the server counts them), and later sections (server or GPU
metrics) follow a blank line. Latencies are in microseconds there; here in milliseconds.
"""

from __future__ import annotations

import csv

PERCENTILES = (50, 90, 95, 99)
THROUGHPUT = "Inferences/Second"
# What perf_analyzer says when no window of its trials is within --stability-percentage of the
# others, and the looser criterion this project's runs fall back to on the noisy 2-vCPU VM
# (benchmarks.compare's cross-check uses it from the start)
UNSTABLE = "Failed to obtain stable measurement"
LOOSE_STABILITY = 50


def parse_csv(text: str, concurrency: int) -> dict[str, float]:
    """Throughput and p50/p90/p95/p99 (ms) of the row for ``concurrency``; ValueError naming
    what is missing when the report has no such row or column."""
    lines = text.lstrip().splitlines()
    first = lines[: next((i for i, line in enumerate(lines) if not line.strip()), len(lines))]
    reader = csv.DictReader(first)
    columns = [c.strip() for c in reader.fieldnames or []]
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    wanted = [THROUGHPUT, *(f"p{p} latency" for p in PERCENTILES)]
    missing = [c for c in ["Concurrency", *wanted] if c not in columns]
    if missing:
        raise ValueError(f"perf_analyzer's report lacks {missing}; its columns: {columns}")
    matching = [r for r in rows if r["Concurrency"] and float(r["Concurrency"]) == concurrency]
    if len(matching) != 1:
        levels = [r["Concurrency"] for r in rows]
        raise ValueError(
            f"perf_analyzer's report has {len(matching)} rows for concurrency {concurrency} "
            f"(its rows: concurrency {levels})"
        )
    (row,) = matching
    out = {"throughput": float(row[THROUGHPUT])}
    out.update({f"p{p}_ms": float(row[f"p{p} latency"]) / 1e3 for p in PERCENTILES})
    return out
