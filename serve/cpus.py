"""How many CPUs this process may actually use: what thread and process counts are sized by.

``os.cpu_count()`` counts the node's cores. A container limited to 4 CPUs on a 64-core node
sees 64 there; sizing intra-op threads by it makes every worker run 16 times the threads it has
CPU time for, and the kernel throttles them all. The real bound is the smaller of the affinity
mask (cpusets, ``taskset``) and the cgroup's CPU quota (a Kubernetes CPU limit).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path | None = None) -> int:
    """The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota
    (cgroup v2 ``cpu.max``, else v1 ``cpu/cpu.cfs_quota_us``, under ``cgroup_root``, by default
    /sys/fs/cgroup: in a container, its own cgroup); at least 1."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(CGROUP_ROOT if cgroup_root is None else cgroup_root)
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: Path) -> int | None:
    """The cgroup's CPU limit in whole CPUs (rounded up), or None when there is none or it
    cannot be read."""
    v2 = cgroup_root / "cpu.max"
    if v2.exists():
        text = _read(v2)
        if text is None:
            return None
        fields = text.split()
        if fields[:1] == ["max"]:
            return None
        return _cpus(v2, fields[0] if fields else "", fields[1] if len(fields) > 1 else "")
    v1 = cgroup_root / "cpu" / "cpu.cfs_quota_us"
    if v1.exists():
        quota, period = _read(v1), _read(cgroup_root / "cpu" / "cpu.cfs_period_us")
        if quota is None or period is None or quota.strip() == "-1":
            return None
        return _cpus(v1, quota.strip(), period.strip())
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError as exc:
        log.warning("cannot read the CPU limit from %s (%s); using the affinity mask", path, exc)
        return None


def _cpus(path: Path, quota: str, period: str) -> int | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        quota_us = period_us = 0
    if quota_us <= 0 or period_us <= 0:
        log.warning(
            "unexpected CPU limit %r %r in %s; using the affinity mask", quota, period, path
        )
        return None
    return max(1, math.ceil(quota_us / period_us))
