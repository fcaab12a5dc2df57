"""The serving loop thread's CPU per c=1 call by shared object and symbol (perf samples of that
thread alone, 1,999 Hz), averaged over alternated rounds, and the difference of two servers:

- ``hop``: the hop floor against warmserve (this checkout);
- ``trees A B``: warmserve from checkout A against warmserve from checkout B (e.g. a worktree
  with some modules compiled by mypyc).

    PYTHONPATH=. python .../loop_symbols.py SECONDS ROUNDS hop
    PYTHONPATH=. python .../loop_symbols.py SECONDS ROUNDS trees A B
"""

from __future__ import annotations

import collections
import contextlib
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks import loadgen
from benchmarks.compare import MODEL, FloorProcess
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

HZ = 1999
Symbol = tuple[str, str]  # (shared object, symbol)


def record(url: str, tid: int, seconds: float) -> dict[Symbol, float]:
    """µs of thread ``tid``'s CPU per call, by symbol, over ``seconds`` of c=1 load."""
    results: list[loadgen.LoadResult] = []
    load = threading.Thread(
        target=lambda: results.append(loadgen.run(url, MODEL, concurrency=1, seconds=seconds + 1))
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "perf.data")
        load.start()
        perf = ["perf", "record", "-q", "-F", str(HZ), "-t", str(tid), "-o", data, "--"]
        subprocess.run([*perf, "sleep", str(seconds)], check=True)
        load.join()
        report = ["perf", "report", "-i", data, "--stdio", "--sort", "dso,sym", "-q", "-n"]
        lines = subprocess.run(report, capture_output=True, text=True, check=True).stdout
    calls = results[0].count * seconds / (seconds + 1)
    samples: collections.Counter[Symbol] = collections.Counter()
    for line in lines.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1].isdigit():
            samples[(parts[2], " ".join(parts[4:]))] += int(parts[1])
    return {key: count / HZ / calls * 1e6 for key, count in samples.items()}


def report(names: tuple[str, str], figures: dict[str, collections.Counter[Symbol]]) -> None:
    a, b = (figures[name] for name in names)
    totals = f"{names[0]} {sum(a.values()):.1f}, {names[1]} {sum(b.values()):.1f}"
    print(f"loop thread µs per call: {totals}")
    by_object: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for key in set(a) | set(b):
        by_object[key[0]][0] += a[key]
        by_object[key[0]][1] += b[key]
    ranked = sorted(by_object.items(), key=lambda item: -(item[1][0] + item[1][1]))
    for library, (x, y) in ranked[:10]:
        print(f"  {library[:60]:60s} {x:6.1f} {y:6.1f}  {y - x:+6.1f}")
    print(f"symbols by |{names[1]} - {names[0]}|:")
    for key in sorted(set(a) | set(b), key=lambda k: -abs(b[k] - a[k]))[:30]:
        figures_ = f"{b[key] - a[key]:+6.1f} ({a[key]:5.1f} {b[key]:5.1f})"
        print(f"  {figures_}  {key[0][:30]} {key[1][:60]}")


def main() -> None:
    seconds, rounds, mode = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    trees = [Path(p) for p in sys.argv[4:6]] if mode == "trees" else []
    names = ("A", "B") if trees else ("hop", "warmserve")
    figures: dict[str, collections.Counter[Symbol]] = {n: collections.Counter() for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        for index in range(rounds):
            with contextlib.ExitStack() as running:
                servers: dict[str, FloorProcess | ServerProcess] = {}
                for n, name in enumerate(names):
                    log = root / f"{name}{index}.log"
                    if name == "hop":
                        servers[name] = FloorProcess(root / "repo" / MODEL, log, hop=True)
                    else:
                        cwd = trees[n] if trees else None
                        served = ServerProcess(log, root / "repo", (), cwd=cwd)
                        running.callback(served.stop)
                        wait_until(served.ready_over_http, 300, f"{name} ready")
                        servers[name] = served
                    running.callback(servers[name].stop)
                for server in servers.values():
                    loadgen.run(server.url, MODEL, concurrency=4, seconds=1.0)
                for name in names if index % 2 == 0 else names[::-1]:
                    server = servers[name]
                    for key, value in record(server.url, server.process.pid, seconds).items():
                        figures[name][key] += value / rounds
    report(names, figures)


if __name__ == "__main__":
    main()
