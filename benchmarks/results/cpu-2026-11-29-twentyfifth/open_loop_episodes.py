"""Are an open loop's slow calls spread out, or bunched in episodes, and what causes them? Open
loop at RATE calls/s for SECONDS against the floor server and warmserve (ROUNDS, each with both
started afresh), recording each call's scheduled time and latency. Prints, per run, the runs of
calls above the p99 (joined when under 5 ms apart), the client's own garbage collections of
1 ms or more (every full one) and the window's start on the same clock; warmserve's processes
log theirs with gclog/sitecustomize.py to $GCLOG_DIR.

    GCLOG_DIR=/tmp/gclogs PYTHONPATH=. python open_loop_episodes.py 1500 5 3
    QUIET_GC=1 ...: the client holds off its full collections while it runs
    (loadgen.no_full_collections, as loadgen.run does since the twenty-fifth session); without
    it, the client collects whenever due, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import uvloop

from benchmarks import loadgen, proctree
from benchmarks.arrivals import ArrivalClock
from benchmarks.compare import MODEL, FloorProcess
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

PROBE = Path(__file__).resolve().parent / "gclog"
Row = tuple[float, float]  # (scheduled, from the window's start; latency), seconds


async def open_loop(url: str, rate: float, seconds: float, seed: int) -> list[Row]:
    payload = loadgen.request_bytes(MODEL)
    rows: list[Row] = []
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(loadgen.METHOD)
        await call(payload, timeout=10)

        async def one(scheduled: float) -> None:
            try:
                await call(payload, timeout=10)
            except grpc.aio.AioRpcError:
                rows.append((scheduled - started, float("nan")))
                return
            rows.append((scheduled - started, time.perf_counter() - scheduled))

        tasks = []
        with ArrivalClock() as clock:
            started = time.perf_counter()
            arrival = started + rng.expovariate(rate)
            while arrival < started + seconds:
                await clock.until(arrival)
                tasks.append(asyncio.create_task(one(arrival)))
                arrival += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    print(f"  window start perf_counter {started:.4f}")
    return sorted(rows)


def episodes(rows: list[Row], threshold: float) -> list[tuple[float, float, int, float]]:
    """Calls slower than ``threshold``, in scheduled order, joined when under 5 ms apart:
    (start, length, calls, worst)."""
    found: list[list[float]] = []
    for t, latency in rows:
        if latency > threshold:
            if found and t - found[-1][1] < 0.005:
                found[-1][1] = t
                found[-1][2] += 1
                found[-1][3] = max(found[-1][3], latency)
            else:
                found.append([t, t, 1, latency])
    return [(s, e - s, int(n), w) for s, e, n, w in found]


def report(name: str, rows: list[Row], cpu_us: float) -> None:
    ms = np.array([r[1] for r in rows if r[1] == r[1]]) * 1e3
    p50, p95, p99 = np.percentile(ms, (50, 95, 99))
    print(
        f"{name:10s} n={len(ms)} p50 {p50:.2f} p95 {p95:.2f} p99 {p99:.2f} "
        f"max {ms.max():.1f} ms  cpu {cpu_us:.0f} µs/call"
    )
    found = episodes(rows, p99 / 1e3)
    print(f"  calls above p99 ({p99:.2f} ms): {sum(e[2] for e in found)} in {len(found)} episodes")
    for start, length, calls, worst in sorted(found, key=lambda e: -e[2])[:8]:
        print(
            f"    at {start:6.3f} s, {length * 1e3:6.1f} ms long, {calls:3d} calls, "
            f"worst {worst * 1e3:.1f} ms"
        )


def measure(url: str, pid: int, rate: float, seconds: float, seed: int) -> tuple[list[Row], float]:
    tree0 = proctree.tree_cpu_seconds(pid)
    with (
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        loadgen.no_full_collections(),  # (a no-op without QUIET_GC=1: main)
    ):
        rows = runner.run(open_loop(url, rate, seconds, seed))
    return rows, (proctree.tree_cpu_seconds(pid) - tree0) / max(1, len(rows)) * 1e6


def client_collection(phase: str, info: dict[str, int], started: list[float] = [0.0]) -> None:  # noqa: B006
    if phase == "start":
        started[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - started[0]) * 1e3
    if ms >= 1.0 or info["generation"] == 2:
        print(f"  CLIENT GC at {started[0]:.4f} gen{info['generation']} {ms:.1f} ms")


def main() -> None:
    rate, seconds, rounds = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    if os.environ.get("QUIET_GC") != "1":  # the client as before: full collections when due
        loadgen.no_full_collections = contextlib.nullcontext  # type: ignore[assignment]
    gc.callbacks.append(client_collection)
    env = {"PYTHONPATH": f"{PROBE}:{os.environ.get('PYTHONPATH', '.')}"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        for index in range(rounds):
            floor = FloorProcess(root / "repo" / MODEL, root / f"floor{index}.log")
            ws = ServerProcess(root / f"ws{index}.log", root / "repo", env=env)
            try:
                wait_until(ws.ready_over_http, 300, "warmserve ready")
                for name, url, pid in (
                    ("floor", floor.url, floor.process.pid),
                    ("warmserve", ws.url, ws.process.pid),
                ):
                    loadgen.run(url, MODEL, concurrency=4, seconds=1.0)
                    rows, cpu = measure(url, pid, rate, seconds, index)
                    report(name, rows, cpu)
            finally:
                floor.stop()
                ws.stop()


if __name__ == "__main__":
    main()
