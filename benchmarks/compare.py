"""warmserve against the bare in-process floor server, same model, same client, same machine.

    python -m benchmarks.compare            # full: closed + open loop, perf_analyzer, plots
    python -m benchmarks.compare --quick    # under a minute: the two headline ratios

Each server runs alone (one after the other) with the demo MLP (ONNX, 64→256→256→10). For each
load level it records P50/P95/P99/max, throughput, errors and the server's CPU time per call
(its whole process tree: warmserve's workers included). Results go to benchmarks/out/ as JSON,
with a latency-vs-throughput plot and latency CDFs; warmserve's own overhead breakdown (from its
timestamps) is printed beside the totals.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.proctree import tree_cpu_seconds
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
PERF_ANALYZER = ROOT / "benchmarks" / ".tools" / "perf_analyzer"
MODEL = "mlp_onnx"


class FloorProcess:
    def __init__(self, model_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self._log = log.open("wb")
        command = [sys.executable, "-m", "benchmarks.floor_server", "--model-dir", str(model_dir)]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)], stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_until(lambda: b"listening" in log.read_bytes(), 60, "the floor server")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self._log.close()


def _machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    return {
        "cpu": cpu or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _measure(
    url: str, pid: int, *, concurrency: int = 0, rate: float = 0, seconds: float
) -> dict[str, Any]:
    before = tree_cpu_seconds(pid)
    result = loadgen.run(url, MODEL, concurrency=concurrency, rate=rate, seconds=seconds)
    cpu = tree_cpu_seconds(pid) - before
    row = result.summary()
    row["server_cpu_us_per_call"] = cpu / max(1, result.count) * 1e6
    row["latencies_ms"] = result.latencies_ms
    return row


def _perf_analyzer(url: str, concurrency: int) -> dict[str, float] | None:
    if not PERF_ANALYZER.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pa.csv"
        command = [str(PERF_ANALYZER), "-m", MODEL, "-i", "grpc", "-u", url, "-f", str(report)]
        command += ["--concurrency-range", f"{concurrency}:{concurrency}"]
        command += ["--measurement-interval", "2000", "--stability-percentage", "50"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=180)
        if run.returncode != 0 or not report.exists():
            return None
        (row,) = list(csv.DictReader(report.open()))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3,
    }


def run_server(name: str, url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    loadgen.run(url, MODEL, concurrency=4, seconds=1.0)  # warm both ends before measuring
    closed = [_measure(url, pid, concurrency=c, seconds=args.seconds) for c in args.concurrency]
    opened = [_measure(url, pid, rate=r, seconds=args.seconds) for r in args.rates]
    cross = {c: _perf_analyzer(url, c) for c in (1, 16)} if not args.quick else {}
    for row in closed + opened:
        print(
            f"  {name:9s} {row['mode']:6s} {row['level']:>6}: {row['throughput']:7.0f}/s "
            f"p50 {row['p50_ms']:.3f} p95 {row['p95_ms']:.3f} p99 {row['p99_ms']:.3f} "
            f"max {row['max_ms']:.1f} ms, errors {row['errors']}, "
            f"server CPU {row['server_cpu_us_per_call']:.0f} µs/call"
        )
    return {"closed": closed, "open": opened, "perf_analyzer": cross}


def _ratios(results: dict[str, Any]) -> dict[str, float]:
    ws, floor = results["warmserve"]["closed"], results["floor"]["closed"]
    by_c = lambda rows: {r["level"]: r for r in rows}  # noqa: E731
    w, f = by_c(ws), by_c(floor)
    ratios: dict[str, float] = {}
    if 1 in w and 1 in f:
        ratios["c1_p50_vs_floor"] = w[1]["p50_ms"] / f[1]["p50_ms"]
        ratios["c1_cpu_vs_floor"] = w[1]["server_cpu_us_per_call"] / f[1]["server_cpu_us_per_call"]
    if 16 in w and 16 in f:
        ratios["c16_throughput_vs_floor"] = w[16]["throughput"] / f[16]["throughput"]
        ratios["c16_p99_vs_floor"] = w[16]["p99_ms"] / f[16]["p99_ms"]
    return ratios


def _plots(results: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, data in results.items():
        rows = data["closed"]
        ax.plot(
            [r["throughput"] for r in rows], [r["p50_ms"] for r in rows], "o-", label=f"{name} p50"
        )
        ax.plot(
            [r["throughput"] for r in rows], [r["p99_ms"] for r in rows], "x--", label=f"{name} p99"
        )
    ax.set(
        xlabel="throughput (inferences/s)",
        ylabel="latency (ms)",
        title="Latency vs throughput (closed loop)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(stem.with_name(stem.name + "-latency-throughput.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, data in results.items():
        for row in data["closed"]:
            values = np.sort(row["latencies_ms"])
            ax.plot(values, np.linspace(0, 1, len(values)), label=f"{name} c={row['level']}")
    ax.set(
        xscale="log",
        xlabel="latency (ms)",
        ylabel="fraction of calls",
        title="Latency CDF (closed loop)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(stem.with_name(stem.name + "-cdf.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="c=1 and c=16 only, 2 s each")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--rates", type=float, nargs="*", default=[250, 500, 1000])
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.concurrency, args.rates = 2.0, [1, 16], []
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_mlp_onnx(Path(tmp) / "repo" / MODEL)
        floor = FloorProcess(folder, Path(tmp) / "floor.log")
        try:
            results["floor"] = run_server("floor", floor.url, floor.process.pid, args)
        finally:
            floor.stop()
        server = ServerProcess(Path(tmp) / "warmserve.log", Path(tmp) / "repo")
        try:
            server.wait_ready()
            results["warmserve"] = run_server("warmserve", server.url, server.process.pid, args)
            breakdown = server.http_json(f"/warmserve/models/{MODEL}/latency")[1]["breakdown_us"]
        finally:
            server.stop()
    ratios = _ratios(results)
    print("\nwarmserve overhead breakdown (µs; codec and queue per request, the rest per batch):")
    print("  " + ", ".join(f"{k} {v:.0f}" for k, v in breakdown.items()))
    print("\nratios (warmserve / floor): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if args.quick:
        return
    for name in results:
        for c, pa in results[name]["perf_analyzer"].items():
            if pa:
                print(
                    f"perf_analyzer {name} c={c}: {pa['throughput']:.0f}/s "
                    f"p50 {pa['p50_ms']:.3f} ms p99 {pa['p99_ms']:.3f} ms"
                )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = OUT / f"compare-{stamp}"
    plots = _plots(results, stem)
    record = {"machine": _machine(), "ratios": ratios, "breakdown_us": breakdown}
    for name, data in results.items():
        for row in data["closed"] + data["open"]:
            row.pop("latencies_ms", None)
        record[name] = data
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(f"\nwrote {stem.with_suffix('.json')} and {', '.join(str(p) for p in plots)}")


if __name__ == "__main__":
    main()
