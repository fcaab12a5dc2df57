"""CPU time of a process and all its descendants, from /proc (Linux).

A descendant that ends between two readings leaves the tree, but its time does not vanish: once
its parent reaps it, the kernel adds it to the parent's cutime/cstime (waited-for children),
which the tree's total includes. Without those, a worker or relay that exited mid-run would take
its whole life's CPU time off the difference (or a short-lived helper's time would be lost).
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _after_name(stat: str) -> list[str]:
    """The fields of a /proc stat line after the parenthesised name (which may hold spaces)."""
    return stat.rsplit(")", 1)[1].split()


def _cpu_seconds(fields: list[str]) -> float:
    """User + system seconds from the fields after the name (utime, stime: 14th, 15th)."""
    return (int(fields[11]) + int(fields[12])) / TICKS


def _cpu_seconds_with_reaped(fields: list[str]) -> float:
    """Its own user + system seconds and its reaped children's (cutime, cstime: 16th, 17th)."""
    return _cpu_seconds(fields) + (int(fields[13]) + int(fields[14])) / TICKS


def _stats() -> dict[int, tuple[int, float]]:
    """pid → (parent pid, user+system seconds, its reaped children's included) for every live
    process."""
    out: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _after_name((entry / "stat").read_text())
        except OSError:
            continue
        out[int(entry.name)] = (int(fields[1]), _cpu_seconds_with_reaped(fields))
    return out


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and every live descendant, and of the descendants
    that ended and were reaped by one of them."""
    stats = _stats()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of each live thread of ``pid``, keyed "name/tid"."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        out[f"{name}/{task.name}"] = _cpu_seconds(_after_name(text))
    return out
