"""System calls per call (strace -c -f on every process of each server's tree) of the floor,
the hop floor and warmserve, for 2,000 sequential ModelInfer calls (c=1). Counts, not
timings: the VM's noise does not move them.

    PYTHONPATH=. .venv/bin/python \
        benchmarks/results/cpu-2026-11-28-nineteenth/syscalls_per_call.py /tmp/strace
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import uvloop

from benchmarks import loadgen
from benchmarks.compare import MODEL, FloorProcess
from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess

CALLS = 2000


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def tree(pid: int) -> list[int]:
    todo, out = [pid], []
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


async def calls(url: str, payload: bytes, count: int) -> None:
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(loadgen.METHOD)
        for _ in range(count):
            await call(payload, timeout=30)


def per_call(summary: str) -> list[tuple[float, str]]:
    """(calls per ModelInfer call, syscall) from strace -c's table, the frequent ones."""
    rows = []
    for line in summary.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            count = int(parts[3])
            if count >= CALLS // 10:
                rows.append((count / CALLS, parts[-1]))
    return sorted(rows, reverse=True)


def trace(name: str, url: str, pid: int, out: Path) -> None:
    payload = loadgen.request_bytes(MODEL)
    uvloop.run(calls(url, payload, 500))  # warm
    tracers = []
    for p in tree(pid):
        command = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:60].decode()
        summary = out.with_name(f"{out.name}.{p}")
        strace = ["strace", "-c", "-f", "-p", str(p), "-o", str(summary)]
        tracer = subprocess.Popen(strace, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tracers.append((p, command, summary, tracer))
    time.sleep(1.0)  # (strace attached)
    uvloop.run(calls(url, payload, CALLS))
    for *_, tracer in tracers:
        tracer.send_signal(2)
        tracer.wait(30)
    print(f"== {name}: {CALLS} calls")
    for p, command, summary, _ in tracers:
        rows = per_call(summary.read_text())
        total = sum(n for n, _ in rows)
        listed = ", ".join(f"{call} {n:.2f}" for n, call in rows)
        print(f"  {p} {command}: {total:.2f} syscalls/call: {listed}")


def main() -> None:
    outdir = Path(sys.argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_mlp_onnx(Path(tmp) / "repo" / MODEL)
        floor = FloorProcess(folder, Path(tmp) / "floor.log")
        hop = FloorProcess(folder, Path(tmp) / "hop.log", hop=True)
        server = ServerProcess(Path(tmp) / "w.log", Path(tmp) / "repo")
        try:
            server.wait_ready()
            trace("floor", floor.url, floor.process.pid, outdir / "floor")
            trace("hop", hop.url, hop.process.pid, outdir / "hop")
            trace("warmserve", server.url, server.process.pid, outdir / "warm")
        finally:
            server.stop()
            hop.stop()
            floor.stop()


if __name__ == "__main__":
    main()
