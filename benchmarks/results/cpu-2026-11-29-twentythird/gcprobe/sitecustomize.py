"""Imported by every Python process started with this folder on PYTHONPATH (gc_freeze_ab.py puts
it there for the server's tree): records each garbage collection of the process (generation,
duration, objects collected) and, at SIGUSR2 or exit, writes a summary to
$GCPROBE_DIR/<pid>.txt and starts counting afresh."""

import atexit
import gc
import os
import signal
import sys
import time

_OUT = os.environ.get("GCPROBE_DIR")
_started: dict[str, int] = {}
_done: list[tuple[int, int, int]] = []  # (generation, ns, objects collected)


def _on_collection(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started["ns"] = time.perf_counter_ns()
    else:
        ns = time.perf_counter_ns() - _started.get("ns", 0)
        _done.append((info["generation"], ns, info["collected"]))


def _dump(*_: object) -> None:
    assert _OUT is not None
    times: dict[int, list[int]] = {}
    collected: dict[int, int] = {}
    for generation, ns, count in _done:
        times.setdefault(generation, []).append(ns)
        collected[generation] = collected.get(generation, 0) + count
    name = os.path.basename(sys.argv[0]) + " " + " ".join(sys.argv[1:3])
    lines = [f"{name} objects tracked {len(gc.get_objects())} frozen {gc.get_freeze_count()}"]
    for generation in sorted(times):
        ns_each = sorted(times[generation])
        lines.append(
            f"gen{generation}: n={len(ns_each)} total={sum(ns_each) / 1e6:.1f} ms"
            f" p50={ns_each[len(ns_each) // 2] / 1e3:.0f} us max={ns_each[-1] / 1e3:.0f} us"
            f" collected={collected[generation]}"
        )
    with open(os.path.join(_OUT, f"{os.getpid()}.txt"), "w") as out:
        out.write("\n".join(lines) + "\n")
    _done.clear()


if _OUT:
    gc.callbacks.append(_on_collection)
    atexit.register(_dump)
    signal.signal(signal.SIGUSR2, _dump)
