"""Old code against new, on the same machine, in alternated rounds: is a change measurable?

    python -m benchmarks.ab BASE [--concurrency 1 16] [--rounds 10] [--seconds 2] [--streaming]
    python -m benchmarks.ab BASE --image --frontends 2 --concurrency 64
    python -m benchmarks.ab BASE --concurrency 16 --rates 1500 2500

``--rates``: open-loop levels (Poisson arrivals at that many calls/s, latency counted from each
call's scheduled send), measured after the closed-loop ones. There the server's CPU per call is
its capacity: a server that needs more CPU per call saturates the machine at a lower rate, and
its queue (and latency) grows without bound, which a closed loop never shows.

``--image``: relay_cost's model with ResNet-50's request size (150 KB) that computes next to
nothing, driven by 2 client processes of 4 connections each; ``--frontends N``: both servers
behind N relays. The serving loop's figure is then the one that limits a GPU host.

BASE is a commit (anything ``git rev-parse`` takes); the new side is the working tree. The base
is checked out into a temporary git worktree (with this tree's generated stubs, which git
ignores) and both serve the demo MLP side by side. Each round starts both servers afresh,
measures both at every level (who goes first alternates) and stops them: where the kernel
happens to place their processes is then no bias that lasts the whole run (two instances of
the same code kept up for ten rounds differed by 3-5 %; started afresh each round, by 0-0.3 %).
It prints, per level and figure, both medians and the ratio new / base round by round: the
ratio's median, its spread, and a distribution-free 95 % interval for the median (rounds.py;
6 rounds at least), which says whether the change shows above the machine's noise ("not told
apart" when the interval holds 1).
Figures: throughput, p50, p99, the server tree's CPU per call, and the serving process's
busiest thread per call (its event loop). Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import loadgen, proctree, rounds
from benchmarks.compare import MODEL, exit_on_sigterm
from benchmarks.relay_cost import build_image_passthrough, image_request
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

ROOT = Path(__file__).resolve().parents[1]
STUBS = Path("serve") / "frontend" / "pb"
FIGURES = (
    ("throughput", "calls/s", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.3f}"),
    ("p99_ms", "p99 ms", "{:.3f}"),
    ("server_cpu_us_per_call", "tree µs/call", "{:.0f}"),
    ("loop_us_per_call", "loop µs/call", "{:.0f}"),
)


@contextlib.contextmanager
def worktree(commit: str, folder: Path) -> Iterator[Path]:
    """``commit`` checked out at ``folder`` (removed afterwards), with this tree's stubs."""

    def run(*args: str) -> None:
        subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True)

    run("worktree", "add", "--detach", str(folder), commit)
    try:
        shutil.copytree(ROOT / STUBS, folder / STUBS, dirs_exist_ok=True)
        yield folder
    finally:
        run("worktree", "remove", "--force", str(folder))


Level = tuple[str, float]  # ("c", concurrency): closed loop; ("r", calls/s): open loop


def level_name(level: Level) -> str:
    kind, value = level
    return f"c={value:g}" if kind == "c" else f"r={value:g}"


def measure(
    server: ServerProcess, level: Level, seconds: float, load: dict[str, Any]
) -> dict[str, Any]:
    """One run at ``level`` (``load``: loadgen.run's model and options): loadgen's figures, the
    tree's CPU per call and the busiest thread's (the serving process's event loop) per call."""
    pid = server.process.pid
    tree0, threads0 = proctree.tree_cpu_seconds(pid), proctree.thread_cpu_seconds(pid)
    kind, value = level
    if kind == "c":
        result = loadgen.run(server.url, concurrency=int(value), seconds=seconds, **load)
    else:
        result = loadgen.run(server.url, rate=value, seconds=seconds, **load)
    tree1, threads1 = proctree.tree_cpu_seconds(pid), proctree.thread_cpu_seconds(pid)
    calls = max(1, result.count)
    busiest = max(threads1[t] - threads0.get(t, 0.0) for t in threads1)
    row = result.summary()
    row["server_cpu_us_per_call"] = (tree1 - tree0) / calls * 1e6
    row["loop_us_per_call"] = busiest / calls * 1e6
    return row


def verdict(low: float, high: float) -> str:
    """What a 95 % interval for the median ratio new / base says."""
    if math.isnan(low):
        return "too few rounds for a 95 % interval: 6 at least"
    span = f"95 % interval {low:.3f}–{high:.3f}"
    if low <= 1.0 <= high:
        return f"{span}: not told apart"
    return f"{span}: new {'higher' if low > 1.0 else 'lower'}"


def report(results: dict[str, list[dict[str, Any]]], levels: list[Level]) -> dict[str, Any]:
    """Print and return, per level and figure: both medians and new / base round by round."""
    out: dict[str, Any] = {}
    for index, level in enumerate(levels):
        base, new = results["base"][index], results["new"][index]
        name = level_name(level)
        print(f"{name}: {len(base['rounds']['throughput'])} rounds")
        for key, label, fmt in FIGURES:
            ratios = rounds.paired_ratios(new, base, key)
            median = float(np.median(ratios))
            low, high = rounds.median_interval(ratios)
            print(
                f"  {label:13s} base {fmt.format(base[key]):>8s}  new {fmt.format(new[key]):>8s}"
                f"  new/base median {median:.3f} (rounds {min(ratios):.3f}–{max(ratios):.3f}; "
                f"{verdict(low, high)})"
            )
            out[f"{name.replace('=', '')}_{key}"] = {
                "median": median,
                "interval_95": [low, high],
                "rounds": ratios,
            }
    return out


def main() -> None:
    exit_on_sigterm()  # the servers and the base's worktree are removed on SIGTERM too
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit to compare the working tree with")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--rates", type=float, nargs="*", default=[], help="open loop: calls/s")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--streaming", action="store_true", help="streaming clients")
    parser.add_argument("--frontends", type=int, default=1, help="relay processes (1: none)")
    parser.add_argument("--image", action="store_true", help="150 KB requests (relay_cost's)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    levels: list[Level] = [("c", c) for c in args.concurrency] + [("r", r) for r in args.rates]
    if not levels or min(value for _, value in levels) <= 0:
        parser.error("give at least one --concurrency or --rates level, each above 0")
    if args.rates and args.streaming:
        parser.error("--streaming is a closed-loop mode: no --rates with it")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as checkout:
        root = Path(tmp)
        trees = {"base": checkout.enter_context(worktree(args.base, root / "base")), "new": ROOT}
        load: dict[str, Any] = {"model": MODEL, "streaming": args.streaming}
        if args.image:
            model = build_image_passthrough(root / "repo" / "image_passthrough").name
            load = {**load, "model": model, "payload": image_request(model)}
            load |= {"processes": 2, "connections": 4}
        else:
            build_mlp_onnx(root / "repo" / MODEL)
        options = ("--frontends", str(args.frontends)) if args.frontends > 1 else ()
        print(f"{args.base} against the working tree: {args.rounds} rounds of {args.seconds} s")
        samples: dict[str, dict[Level, list[dict[str, Any]]]] = {
            side: {level: [] for level in levels} for side in trees
        }
        for index in range(args.rounds):
            order = ["base", "new"] if index % 2 == 0 else ["new", "base"]
            with contextlib.ExitStack() as running:
                servers = {}
                for side in order:
                    server = ServerProcess(
                        root / f"{side}-{index}.log", root / "repo", options, cwd=trees[side]
                    )
                    running.callback(server.stop)
                    servers[side] = server
                for side in order:
                    wait_until(servers[side].ready_over_http, 300, f"the {side} server ready")
                    loadgen.run(servers[side].url, concurrency=4, seconds=1.0, **load)
                for side in order:
                    for level in levels:
                        row = measure(servers[side], level, args.seconds, load)
                        samples[side][level].append(row)
        results = {
            side: [rounds.median_row(samples[side][level]) for level in levels] for side in trees
        }
        report(results, levels)


if __name__ == "__main__":
    main()
