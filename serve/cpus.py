"""How many CPUs this process may actually use: what thread and process counts are sized by.

``os.cpu_count()`` counts the node's cores. A container limited to 4 CPUs on a 64-core node
sees 64 there; sizing intra-op threads by it makes every worker run 16 times the threads it has
CPU time for, and the kernel throttles them all. The real bound is the smaller of the affinity
mask (cpusets, ``taskset``: the kernel keeps it within ``cpuset.cpus.effective``) and the CPU
quota of the process's cgroup and of every cgroup above it (a Kubernetes CPU limit sits on the
container's cgroup or on the pod's, a systemd ``CPUQuota=`` on a slice or a service).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def available_cpus(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """The CPUs this process may use: its affinity mask, capped by the tightest CPU quota on
    its cgroup's path (cgroup v2 ``cpu.max`` of its own cgroup, named in ``proc_cgroup``, by
    default /proc/self/cgroup, and of each ancestor up to ``cgroup_root``, by default
    /sys/fs/cgroup; else v1 ``cpu/cpu.cfs_quota_us`` under ``cgroup_root``); at least 1."""
    cpus = len(os.sched_getaffinity(0))
    root = CGROUP_ROOT if cgroup_root is None else cgroup_root
    own = own_cgroup(PROC_SELF_CGROUP if proc_cgroup is None else proc_cgroup)
    quota = cgroup_cpu_quota(root, own)
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def own_cgroup(proc_cgroup: Path) -> str:
    """The process's cgroup v2 path ("0::/kubepods/pod1/c1" → "/kubepods/pod1/c1"), relative to
    the hierarchy's root as this process sees it; "/" when there is no v2 line (cgroup v1
    alone) or the file cannot be read."""
    try:
        text = proc_cgroup.read_text()
    except OSError as exc:
        log.debug("cannot read %s (%s); looking at the cgroup root only", proc_cgroup, exc)
        return "/"
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return "/"


def cgroup_levels(cgroup_root: Path, own: str) -> list[Path]:
    """The folders of ``own``'s cgroup and of its ancestors under ``cgroup_root``, the root
    first. A path that leaves the root (a cgroup outside this namespace: "/../x") gives the
    root alone."""
    levels = [cgroup_root]
    for part in PurePosixPath(own).parts:
        if part in ("/", "."):
            continue
        if part == "..":
            return [cgroup_root]
        levels.append(levels[-1] / part)
    return levels


def cgroup_cpu_quota(cgroup_root: Path, own: str = "/") -> int | None:
    """The CPU limit in whole CPUs (rounded up) on cgroup ``own``'s path: the smallest v2
    ``cpu.max`` from ``cgroup_root`` down to ``own`` (a limit on any ancestor binds its
    descendants too); without any, cgroup v1's ``cpu/cpu.cfs_quota_us`` under ``cgroup_root``.
    None when there is no limit or none can be read."""
    limits: list[int] = []
    found_v2 = False
    for level in cgroup_levels(cgroup_root, own):
        v2 = level / "cpu.max"
        if not v2.is_file():
            continue
        found_v2 = True
        limit = _v2_limit(v2)
        if limit is not None:
            limits.append(limit)
    if found_v2:
        return min(limits) if limits else None
    v1 = cgroup_root / "cpu" / "cpu.cfs_quota_us"
    if v1.exists():
        quota, period = _read(v1), _read(cgroup_root / "cpu" / "cpu.cfs_period_us")
        if quota is None or period is None or quota.strip() == "-1":
            return None
        return _cpus(v1, quota.strip(), period.strip())
    return None


def _v2_limit(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    fields = text.split()
    if fields[:1] == ["max"]:
        return None
    return _cpus(path, fields[0] if fields else "", fields[1] if len(fields) > 1 else "")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError as exc:
        log.warning("cannot read the CPU limit from %s (%s); ignoring it", path, exc)
        return None


def _cpus(path: Path, quota: str, period: str) -> int | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        quota_us = period_us = 0
    if quota_us <= 0 or period_us <= 0:
        log.warning("unexpected CPU limit %r %r in %s; ignoring it", quota, period, path)
        return None
    return max(1, math.ceil(quota_us / period_us))
