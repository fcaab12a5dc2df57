"""The server's CPU limit (a container's or pod's CFS quota) and how often it stopped the server.

A process in a cgroup with a CPU quota runs at most ``quota`` µs of CPU, summed over all its
threads, every ``period`` µs; past that the kernel stops every thread until the next period
("throttling": Kubernetes CPU limits work this way). A throttled server's event loop is neither
busy nor, while it sits in epoll, waiting for a CPU, so the batcher's view of its own thread
(LoopLoad) can miss that the process as a whole has run out of CPU. ``nr_throttled`` in the
cgroup's ``cpu.stat`` (cgroup v1 and v2 alike) counts the periods in which that happened.

The cgroup is found from /proc/self/cgroup and /proc/self/mountinfo (the mount that holds the
process's cgroup, also inside a container whose cgroup is mounted as its root). Without a quota,
or where none of this can be read, there is nothing to watch (CpuLimit.find returns None).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class CpuLimit:
    """A CFS quota: ``cpus`` (quota / period) and the ``cpu.stat`` file to read throttling from."""

    cpus: float
    stat: Path

    def throttled_periods(self) -> int | None:
        """Periods so far in which the quota stopped the cgroup, or None if unreadable now."""
        try:
            with open(self.stat, "rb") as stats:
                for line in stats:
                    if line.startswith(b"nr_throttled "):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    @staticmethod
    def find(proc: Path = PROC) -> CpuLimit | None:
        """This process's CPU quota, from cgroup v2 or v1 (``proc``: /proc, for tests)."""
        try:
            cgroups = (proc / "self" / "cgroup").read_text()
            mounts = (proc / "self" / "mountinfo").read_text()
        except OSError:
            return None
        for folder in _cgroup_folders(cgroups, mounts):
            limit = _limit_in(folder)
            if limit is not None:
                return limit
        return None


def _cgroup_folders(cgroups: str, mounts: str) -> list[Path]:
    """The folders that hold this process's cpu cgroup: v2's, then v1's cpu controller's."""
    paths: dict[str, str] = {}  # "v2" or "v1" → the process's cgroup path
    for line in cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and controllers == "":
            paths["v2"] = path
        elif "cpu" in controllers.split(","):
            paths["v1"] = path
    folders = []
    for line in mounts.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) < 3:
            continue
        fstype, options = after[0], after[2].split(",")
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2" and "v2" in paths:
            folders.append(_inside(point, root, paths["v2"]))
        elif fstype == "cgroup" and "cpu" in options and "v1" in paths:
            folders.append(_inside(point, root, paths["v1"]))
    return folders


def _inside(point: str, root: str, path: str) -> Path:
    """Where cgroup ``path`` lies under a mount of the hierarchy's ``root`` at ``point``."""
    if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root) :]
    elif root != "/":  # (a container that sees only its own cgroup, mounted as the root)
        path = "/"
    return Path(point) / path.lstrip("/")


def _unescape(field: str) -> str:
    """mountinfo escapes spaces and a few other characters as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda octal: chr(int(octal.group(1), 8)), field)


def _limit_in(folder: Path) -> CpuLimit | None:
    stat = folder / "cpu.stat"
    try:
        if (folder / "cpu.max").exists():  # v2: "max 100000" or "50000 100000"
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
        else:  # v1
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
            if int(quota) < 0:
                return None
        limit = CpuLimit(int(quota) / int(period), stat)
    except (OSError, ValueError, ZeroDivisionError):
        return None
    if limit.throttled_periods() is None:
        return None
    return limit


@functools.cache
def cpu_limit() -> CpuLimit | None:
    """This process's CPU limit, found once (and logged) per process."""
    limit = CpuLimit.find()
    if limit is None:
        log.info("no CPU limit (cgroup CFS quota) found: batching does not watch for throttling")
    else:
        log.info(
            "CPU limit: %.2f CPUs (%s): periods in which it stops the server count as "
            "saturation for batching",
            limit.cpus,
            limit.stat.parent,
        )
    return limit


def throttle_counter() -> Callable[[], int | None] | None:
    """What LoopLoad reads: the process's throttled periods so far, or None without a limit."""
    limit = cpu_limit()
    return None if limit is None else limit.throttled_periods
