"""What the serving process spends per call with and without relay processes (``--frontends``).

    python -m benchmarks.relay_cost [--model mlp_onnx] [--concurrency 16] [--rounds 2]

Serves the demo models with ``--frontends 1`` (the serving process terminates gRPC itself) and
``--frontends N`` (N relays terminate gRPC and pass calls on), alternating, under the same closed
loop (2 client processes, 4 connections each). It prints throughput, latency, the serving
process's busiest thread in µs per call (the figure that caps one process's rate), and the CPU
of the whole server tree per call. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import loadgen, proctree
from tests.integration.harness import ServerProcess, wait_until


def measure(frontends: int, model: str, concurrency: int, seconds: float, log: Path) -> Any:
    args = ("--frontends", str(frontends)) if frontends > 1 else ()
    server = ServerProcess(log, None, args=args)
    try:
        wait_until(server.ready_over_http, 300, "server ready")
        load = {"concurrency": concurrency, "processes": 2, "connections": 4}
        loadgen.run(server.url, model, seconds=1.0, **load)  # warm the path and the clients
        pid = server.process.pid
        threads0, tree0 = proctree.thread_cpu_seconds(pid), proctree.tree_cpu_seconds(pid)
        result = loadgen.run(server.url, model, seconds=seconds, **load)
        threads1, tree1 = proctree.thread_cpu_seconds(pid), proctree.tree_cpu_seconds(pid)
    finally:
        server.stop()
    busiest = max(v - threads0.get(k, 0.0) for k, v in threads1.items())
    calls = max(1, result.count)
    return {
        **result.summary(),
        "frontends": frontends,
        "serving_busiest_thread_us_per_call": busiest / calls * 1e6,
        "serving_busiest_thread_share": busiest / result.seconds,
        "tree_us_per_call": (tree1 - tree0) / calls * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp_onnx")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--frontends", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for frontends in (1, args.frontends):
                log = Path(tmp) / f"server-{round_}-{frontends}.log"
                row = measure(frontends, args.model, args.concurrency, args.seconds, log)
                rows.append(row)
                print(
                    f"frontends={frontends} c={args.concurrency}: {row['throughput']:.0f}/s "
                    f"p50 {row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} ms | serving process's "
                    f"busiest thread {row['serving_busiest_thread_us_per_call']:.0f} µs/call "
                    f"({row['serving_busiest_thread_share']:.0%} busy); whole tree "
                    f"{row['tree_us_per_call']:.0f} µs/call"
                )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
