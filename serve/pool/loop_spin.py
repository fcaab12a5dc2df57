"""An experiment for low-concurrency latency on GPU hosts (``WARMSERVE_LOOP_SPIN=1``; off by
default): while one or two batches are out at workers, the serving loop polls instead of
sleeping, so a worker's answer is read without the wake-up of a sleeping thread.

The workers' own spin (pool.idle_spin_us) took 0.09–0.33 ms off ResNet-50's c=1 p50 on an H200
host. On the 2-vCPU dev VM this one took 4 % off the MLP's c=1 p50 for 13 % more CPU per call
(loop thread +30 %), so it stays off until a GPU host measures it (benchmarks/gpu_check.sh,
run ``loopspin``). With more batches out the loop has work anyway and does not spin; a spin
lasts LONGEST_S at most (it starts again with the next batch sent or answered). Nor does it
spin while the process's CPU limit has stopped it lately (serve/cpus.SpinPause): the spin would
spend the quota that the workers are short of.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from serve.config import loop_spin_from_env
from serve.cpus import SpinPause, throttle_watch

log = logging.getLogger(__name__)

MOST_BATCHES = 2  # spin only while at most this many batches are out (low concurrency)
LONGEST_S = 0.01  # and for at most this long at a time: a long (or hung) batch is slept through


class LoopSpin:
    """Spins the running event loop (``await asyncio.sleep(0)``: each turn polls for I/O with no
    timeout) while the registered worker handles have 1..MOST_BATCHES batches out."""

    def __init__(self, enabled: bool, pause: SpinPause | None = None) -> None:
        self.enabled = enabled
        self.pause = pause  # (None: the process's own, found at the first batch)
        self._handles: weakref.WeakSet[Any] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None
        self.turns = 0  # loop turns spent spinning (for tests)

    def busy(self, handle: Any) -> None:
        """``handle`` (with a ``_pending`` dict of batches out) has just sent a batch, or has
        just had one answered (the spin may be due again once fewer are out)."""
        if not self.enabled:
            return
        self._handles.add(handle)
        if self.pause is None:
            self.pause = SpinPause(throttle_watch(), "the serving loop's spin")
        if self._task is None and not self.pause():
            self._task = asyncio.get_running_loop().create_task(self._spin(), name="loop-spin")

    def _out(self) -> int:
        return sum(len(h._pending) for h in self._handles)

    async def _spin(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + LONGEST_S
        pause = self.pause
        assert pause is not None  # (set by busy(), which starts every spin)
        try:
            while 0 < self._out() <= MOST_BATCHES and loop.time() < end and not pause():
                self.turns += 1
                await asyncio.sleep(0)
        finally:
            self._task = None  # (the handles stay known: their batches out still count)


SPIN = LoopSpin(loop_spin_from_env())
