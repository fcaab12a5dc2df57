"""User and system CPU per call at c=1 of every process and busy thread in each server's tree:
the floor, the hop floor and warmserve, started side by side and measured in turn.

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-28-twentieth/split.py ROUNDS SECONDS
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import loadgen
from benchmarks.compare import MODEL, FloorProcess
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

TICKS = os.sysconf("SC_CLK_TCK")
BUSY_TICKS = 5  # threads below this over a run are not printed


def tree(root: int) -> dict[tuple[int, str], tuple[str, str, int, int]]:
    """(pid, tid) → (command line's end, thread name, utime, stime) for ``root``'s tree."""
    procs: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:80].decode()
        except OSError:
            continue
        procs[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), command)
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            out[(pid, task.name)] = (procs[pid][1][-40:], name, int(fields[11]), int(fields[12]))
        todo.extend(children.get(pid, []))
    return out


def measure(name: str, url: str, pid: int, seconds: float, load: dict[str, str]) -> None:
    before = tree(pid)
    result = loadgen.run(url, concurrency=1, seconds=seconds, **load)
    after = tree(pid)
    calls = result.count

    def us(ticks: int) -> float:
        return ticks / TICKS / calls * 1e6

    per_process: dict[tuple[int, str], tuple[int, int]] = {}
    for key, (command, thread, utime, stime) in after.items():
        _, _, utime0, stime0 = before.get(key, ("", "", 0, 0))
        user, system = utime - utime0, stime - stime0
        user_sum, system_sum = per_process.get((key[0], command), (0, 0))
        per_process[(key[0], command)] = (user_sum + user, system_sum + system)
        if user + system > BUSY_TICKS:
            figures = f"user {us(user):7.1f} sys {us(system):7.1f}"
            print(f"   {name:10s} pid {key[0]} {thread:16s} {figures}")
    user = sum(u for u, _ in per_process.values())
    system = sum(s for _, s in per_process.values())
    p50 = result.summary()["p50_ms"]
    figures = f"tree user {us(user):.1f} sys {us(system):.1f}"
    print(f"{name:10s} calls {calls} p50 {p50:.3f} ms  {figures}")
    for (pid_, command), (u, s) in per_process.items():
        print(f"   proc {pid_} {command!r}: user {us(u):.1f} sys {us(s):.1f}")


def main() -> None:
    rounds, seconds = int(sys.argv[1]), float(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_mlp_onnx(root / "repo" / MODEL)
        load = {"model": MODEL}
        for index in range(rounds):
            with contextlib.ExitStack() as running:
                floor = FloorProcess(root / "repo" / MODEL, root / f"f{index}.log")
                running.callback(floor.stop)
                hop = FloorProcess(root / "repo" / MODEL, root / f"h{index}.log", hop=True)
                running.callback(hop.stop)
                served = ServerProcess(root / f"w{index}.log", root / "repo", ())
                running.callback(served.stop)
                wait_until(served.ready_over_http, 300, "warmserve ready")
                servers = (("floor", floor), ("hop", hop), ("warmserve", served))
                for _, server in servers:
                    loadgen.run(server.url, concurrency=4, seconds=1.0, **load)
                for name, server in servers:
                    measure(name, server.url, server.process.pid, seconds, load)


if __name__ == "__main__":
    main()
