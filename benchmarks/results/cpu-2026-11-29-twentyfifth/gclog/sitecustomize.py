"""Imported by every Python process started with this folder on PYTHONPATH: appends each of the
process's garbage collections that took 1 ms or more, and every full one, to
$GCLOG_DIR/<pid>.log as "<perf_counter at its start> gen<N> <ms> ms collected <n> <program>"
(perf_counter is CLOCK_MONOTONIC: comparable across the processes of one machine)."""

import gc
import os
import sys
import time

_OUT = os.environ.get("GCLOG_DIR")
_started: dict[str, float] = {}


def _on_collection(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started["t"] = time.perf_counter()
        return
    ms = (time.perf_counter() - _started.get("t", 0.0)) * 1e3
    if ms >= 1.0 or info["generation"] == 2:
        assert _OUT is not None
        program = os.path.basename(sys.argv[0]) + " " + " ".join(sys.argv[1:3])
        with open(os.path.join(_OUT, f"{os.getpid()}.log"), "a") as out:
            out.write(
                f"{_started['t']:.4f} gen{info['generation']} {ms:.1f} ms "
                f"collected {info['collected']} {program}\n"
            )


if _OUT:
    gc.callbacks.append(_on_collection)
