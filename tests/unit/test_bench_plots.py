"""make bench's record and plots: the JSON keeps every figure but the raw latencies, and the two
PNG plots are drawn from the rows (with matplotlib from the bench extra, no display needed)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from benchmarks.compare import _plots, _without_latencies

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def server_results(scale: float) -> dict[str, Any]:
    def closed(level: int) -> dict[str, Any]:
        latencies = [scale * level * (1 + i / 100) for i in range(200)]
        return {
            "mode": "closed",
            "level": level,
            "throughput": 1000 * level / scale,
            "p50_ms": latencies[100],
            "p99_ms": latencies[198],
            "latencies_ms": latencies,
        }

    opened = [{"mode": "open", "level": 500.0, "p50_ms": scale, "latencies_ms": [scale]}]
    return {"closed": [closed(1), closed(16)], "open": opened, "perf_analyzer": {"1": None}}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_both_plots_are_written_as_png_images_next_to_the_record(tmp_path):
    results = {"floor": server_results(0.5), "warmserve": server_results(0.6)}
    paths = _plots(results, tmp_path / "compare-x", ["warmserve"])
    names = sorted(p.name for p in paths)
    assert names == ["compare-x-cdf.png", "compare-x-latency-throughput.png"]
    for path in paths:
        width, height = png_size(path)
        assert width > 300 and height > 200, (path.name, width, height)


def test_the_record_drops_each_calls_latency_and_keeps_every_figure():
    data = server_results(1.0)
    record = _without_latencies(data)
    assert all("latencies_ms" not in row for row in record["closed"] + record["open"])
    assert [row["p99_ms"] for row in record["closed"]] == [r["p99_ms"] for r in data["closed"]]
    assert record["perf_analyzer"] == data["perf_analyzer"]
    # the plots are drawn after the record is written: their latencies must still be there
    assert all(len(row["latencies_ms"]) == 200 for row in data["closed"])


def test_the_cdf_puts_the_ith_of_n_calls_at_i_over_n():
    from benchmarks.compare import _ecdf

    values, fractions = _ecdf([3.0, 1.0, 2.0, 4.0])
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert fractions.tolist() == [0.25, 0.5, 0.75, 1.0]  # the median call at 0.5, none at 0
    empty_values, empty_fractions = _ecdf([])
    assert len(empty_values) == len(empty_fractions) == 0
