"""What it costs this host to wake a process that has been idle: socket round trips between two
processes, after gaps of growing length.

    python -m benchmarks.wakeup [--gaps-us 0,50,200,1000,2000] [--count 500] [--out FILE]

A call through warmserve at concurrency 1 wakes processes that were idle for about as long as the
model computes: the worker (between batches), the serving process's event loop (while the worker
computes) and the client (while it waits). A bare in-process server wakes fewer of them, after
shorter idles. On a host whose idle cores drop into deep sleep states, each such wake-up can
cost tens of microseconds; on others it costs nothing. This tool tells which host this is.

The requester busy-waits each gap (its own core stays awake), then sends one byte to the
responder and waits for it back. The responder either sleeps in a blocking recv() between calls,
as warmserve's worker and event loop do ("sleeps"), or polls its socket without ever blocking
("spins", the round trip with no wake-up in it). The difference between the two at a gap is what
waking after that long an idle costs. Timings are printed (and written as JSON), never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

MODES = ("sleeps", "spins")
STOP = b"q"


def _respond(sock: socket.socket, spins: bool) -> None:
    """Echo each byte until told to stop (or the requester goes away)."""
    sock.setblocking(not spins)
    while True:
        try:
            data = sock.recv(64)
        except BlockingIOError:
            continue
        if not data or data == STOP:
            return
        sock.sendall(data)


def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def round_trips(gap_s: float, spins: bool, count: int) -> list[int]:
    """Round-trip times in ns, ``count`` of them, each after ``gap_s`` with nothing sent."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the responder; it exits without running the parent's clean-up
        code = 0
        try:
            ours.close()
            _respond(theirs, spins)
        except BaseException:
            code = 1
        os._exit(code)
    theirs.close()
    ours.settimeout(10.0)  # a responder that died ends the run instead of hanging it
    times: list[int] = []
    try:
        for _ in range(count):
            _busy_wait(gap_s)
            start = time.perf_counter_ns()
            ours.sendall(b"x")
            if ours.recv(64) != b"x":
                raise RuntimeError("the responder answered something else")
            times.append(time.perf_counter_ns() - start)
        ours.sendall(STOP)
    finally:
        ours.close()
        _, status = os.waitpid(pid, 0)
    if status:
        raise RuntimeError(f"the responder exited with status {status}")
    return times


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * q))] / 1e3


def measure(gaps_us: list[int], count: int) -> list[dict[str, Any]]:
    """One row per gap: p50 and p95 round trip (µs) for each mode, and their difference."""
    rows = []
    for gap in gaps_us:
        row: dict[str, Any] = {"gap_us": gap}
        for mode in MODES:
            times = sorted(round_trips(gap / 1e6, mode == "spins", count))
            row[f"{mode}_p50_us"] = _percentile(times, 0.50)
            row[f"{mode}_p95_us"] = _percentile(times, 0.95)
        row["wake_cost_p50_us"] = row["sleeps_p50_us"] - row["spins_p50_us"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaps-us", default="0,50,200,1000,2000", help="idle gaps (µs), a,b,c")
    parser.add_argument("--count", type=int, default=500, help="round trips per gap and mode")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    gaps = [int(g) for g in args.gaps_us.split(",")]
    if args.count < 1 or any(g < 0 for g in gaps):
        parser.error("--count must be positive and every gap zero or more")
    rows = measure(gaps, args.count)
    print(f"{os.cpu_count()} CPUs; {args.count} round trips per row; µs")
    print("  gap   responder sleeps p50 / p95   responder spins p50 / p95   wake-up cost (p50)")
    for r in rows:
        print(
            f"{r['gap_us']:5d}   {r['sleeps_p50_us']:10.1f} / {r['sleeps_p95_us']:7.1f}"
            f"   {r['spins_p50_us']:12.1f} / {r['spins_p95_us']:7.1f}"
            f"   {r['wake_cost_p50_us']:14.1f}"
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
