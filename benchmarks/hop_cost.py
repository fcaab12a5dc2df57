"""What one process hop costs on this machine, with nothing of warmserve in it.

A parent on uvloop (an asyncio protocol, as warmserve's front end talks to a worker) sends 16
bytes over a socketpair to a forked child blocked in recv(), which sends them back. Between round
trips the parent keeps its core busy for ``--gap-us`` microseconds, as a front end does between
requests at concurrency 1: the longer the child sleeps, the more its wake-up costs (idle CPU,
cold caches). Prints the CPU time of each side per round trip.

    python -m benchmarks.hop_cost --gap-us 0 200 400 800
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time

import uvloop

WARM_TRIPS = 500


def _child(sock: socket.socket) -> None:
    while True:
        data = sock.recv(64)
        if not data:
            return
        sock.send(data)


class _Parent(asyncio.Protocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.reply is not None
        self.reply.set_result(data)


def _busy(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def _trips(sock: socket.socket, trips: int, gap_us: float) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    _, parent = await loop.connect_accepted_socket(_Parent, sock=sock)
    assert parent.transport is not None

    async def trip() -> None:
        parent.reply = loop.create_future()
        parent.transport.write(b"x" * 16)  # type: ignore[union-attr]
        await parent.reply

    for _ in range(WARM_TRIPS):
        await trip()
    cpu, busy = time.process_time(), 0.0
    for _ in range(trips):
        start = time.process_time()
        _busy(gap_us)
        busy += time.process_time() - start
        await trip()
    return (time.process_time() - cpu - busy) / trips, busy / trips


def measure(gap_us: float, trips: int) -> dict[str, float]:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: a blocking echo loop, then exit without cleanup handlers
        ours.close()
        _child(theirs)
        os._exit(0)
    theirs.close()
    try:
        parent_s, _ = uvloop.run(_trips(ours, trips, gap_us))
    finally:
        ours.close()
    _, _, usage = os.wait4(pid, 0)
    child_s = (usage.ru_utime + usage.ru_stime) / (trips + WARM_TRIPS)
    return {"gap_us": gap_us, "parent_us": parent_s * 1e6, "child_us": child_s * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gap-us", type=float, nargs="*", default=[0, 200, 400, 800])
    parser.add_argument("--trips", type=int, default=5000)
    args = parser.parse_args()
    for gap in args.gap_us:
        row = measure(gap, args.trips)
        print(
            f"parent busy {gap:5.0f} µs between trips: hop CPU parent {row['parent_us']:5.1f} µs "
            f"+ child {row['child_us']:5.1f} µs = {row['parent_us'] + row['child_us']:5.1f} µs"
        )


if __name__ == "__main__":
    main()
