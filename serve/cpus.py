"""How many CPUs this process may actually use: what thread and process counts are sized by; and
how often its CPU limit stopped it.

``os.cpu_count()`` counts the node's cores. A container limited to 4 CPUs on a 64-core node
sees 64 there; sizing intra-op threads by it makes every worker run 16 times the threads it has
CPU time for, and the kernel throttles them all. The real bound is the smaller of the affinity
mask (cpusets, ``taskset``: the kernel keeps it within ``cpuset.cpus.effective``) and the CPU
quota of the process's cgroup and of every cgroup above it (a Kubernetes CPU limit sits on the
container's cgroup or on the pod's, a systemd ``CPUQuota=`` on a slice or a service).

A quota lets a cgroup run ``quota`` µs of CPU, summed over all its threads, every ``period`` µs;
past that the kernel stops every thread until the next period. ``nr_throttled`` in the cgroup's
``cpu.stat`` (v1 and v2 alike) counts the periods in which that happened: the batcher reads it
(throttle_watch) because a throttled server's event loop, stopped while it sits in epoll, looks
neither busy nor short of a CPU from its own thread's clocks.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
SPIN_CHECK_S = 0.05  # a busy poll asks this often whether the CPU limit has stopped the process
SPIN_THROTTLE_MEMORY_S = 1.0  # and pauses for this long after it last found it had


@dataclass(frozen=True, slots=True)
class Quota:
    """A CPU quota on the process's cgroup path: ``cpus`` (quota / period), set on the cgroup
    ``folder``, whose ``cpu.stat`` counts the periods in which it stopped the cgroup."""

    folder: Path
    cpus: float


def available_cpus(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """The CPUs this process may use: its affinity mask, capped by the tightest CPU quota on
    its cgroup's path (cpu_quotas), rounded up; at least 1."""
    cpus = len(os.sched_getaffinity(0))
    quotas = cpu_quotas(cgroup_root, proc_cgroup)
    if quotas:
        cpus = min(cpus, *(max(1, math.ceil(quota.cpus)) for quota in quotas))
    return max(1, cpus)


def cpu_quotas(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> list[Quota]:
    """Every CPU quota on the process's cgroup path (a limit on any ancestor binds its
    descendants too): cgroup v2 ``cpu.max`` of its own cgroup, named in ``proc_cgroup`` (by
    default /proc/self/cgroup), and of each ancestor up to ``cgroup_root`` (by default
    /sys/fs/cgroup); without any v2 ``cpu.max``, v1 ``cpu/cpu.cfs_quota_us`` at the root of the
    v1 cpu hierarchy (a container's own cgroup) and on the path to the process's v1 cpu cgroup
    where that lies under it (a host's). Unreadable or malformed limits are skipped, with a
    warning."""
    root = CGROUP_ROOT if cgroup_root is None else cgroup_root
    own, own_v1 = own_cgroups(PROC_SELF_CGROUP if proc_cgroup is None else proc_cgroup)
    quotas: list[Quota] = []
    found_v2 = False
    for level in cgroup_levels(root, own):
        v2 = level / "cpu.max"
        if not v2.is_file():
            continue
        found_v2 = True
        cpus = _v2_limit(v2)
        if cpus is not None:
            quotas.append(Quota(level, cpus))
    if found_v2:
        return quotas
    for level in cgroup_levels(root / "cpu", own_v1):
        v1 = level / "cpu.cfs_quota_us"
        if not v1.exists():
            continue
        quota, period = _read(v1), _read(level / "cpu.cfs_period_us")
        if quota is None or period is None or quota.strip() == "-1":
            continue
        cpus = _cpus(v1, quota.strip(), period.strip())
        if cpus is not None:
            quotas.append(Quota(level, cpus))
    return quotas


def own_cgroups(proc_cgroup: Path) -> tuple[str, str]:
    """The process's cgroup v2 path ("0::/kubepods/pod1/c1" → "/kubepods/pod1/c1") and its v1
    cpu controller's ("4:cpu,cpuacct:/docker/c1" → "/docker/c1"), relative to each hierarchy's
    root as this process sees it; "/" for one that is not there or when the file cannot be
    read."""
    try:
        text = proc_cgroup.read_text()
    except OSError as exc:
        log.debug("cannot read %s (%s); looking at the cgroup root only", proc_cgroup, exc)
        return "/", "/"
    v2 = v1 = "/"
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and not controllers:
            v2 = path.strip() or "/"
        elif "cpu" in controllers.split(","):
            v1 = path.strip() or "/"
    return v2, v1


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


def _v2_limit(path: Path) -> float | None:
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


def _cpus(path: Path, quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        quota_us = period_us = 0
    if quota_us <= 0 or period_us <= 0:
        log.warning("unexpected CPU limit %r %r in %s; ignoring it", quota, period, path)
        return None
    return quota_us / period_us


class ThrottleCount:
    """The periods so far in which a CPU quota stopped the process's cgroup: ``nr_throttled``
    summed over the ``cpu.stat`` of each cgroup on its path that has a quota (read_limit).
    Called, it returns that count, or None when a file cannot be read (any more)."""

    def __init__(self, quotas: list[Quota]) -> None:
        self.quotas = quotas
        self.stats = [quota.folder / "cpu.stat" for quota in quotas]

    def __call__(self) -> int | None:
        total = 0
        for quota in self.quotas:
            stat = read_limit(quota)
            if stat is None:
                return None
            total += stat.throttled
        return total


@dataclass(frozen=True, slots=True)
class LimitStat:
    """What a quota's ``cpu.stat`` says so far: ``periods`` (enforcement periods elapsed while
    the cgroup ran), ``throttled`` (periods in which the quota stopped it) and ``throttled_s``
    (how long it stood stopped, summed over its CPUs' run queues), for Prometheus."""

    cpus: float
    periods: int
    throttled: int
    throttled_s: float


def tightest_quota(quotas: list[Quota]) -> Quota | None:
    """The quota with the fewest CPUs (the one that binds first), or None."""
    return min(quotas, key=lambda quota: quota.cpus, default=None)


def read_limit(quota: Quota) -> LimitStat | None:
    """``quota``'s LimitStat now (v1 ``throttled_time`` in ns, v2 ``throttled_usec``), or None
    when its ``cpu.stat`` cannot be read or lacks the counts."""
    try:
        text = (quota.folder / "cpu.stat").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    if "nr_periods" not in values or "nr_throttled" not in values:
        return None
    if "throttled_usec" in values:
        throttled_s = values["throttled_usec"] / 1e6
    else:
        throttled_s = values.get("throttled_time", 0) / 1e9
    return LimitStat(quota.cpus, values["nr_periods"], values["nr_throttled"], throttled_s)


@functools.cache
def throttle_counter() -> Callable[[], int | None] | None:
    """The process's ThrottleCount, or None without a CPU quota (or an unreadable one): found
    once per process, and logged."""
    quotas = cpu_quotas()
    if not quotas:
        log.info("no CPU limit (CFS quota) on this process's cgroup: no throttling to watch")
        return None
    count = ThrottleCount(quotas)
    limit = min(quota.cpus for quota in quotas)
    if count() is None:
        log.warning(
            "CPU limit %.2f CPUs, but %s cannot be read: its throttling is not watched",
            limit,
            " or ".join(str(stat) for stat in count.stats),
        )
        return None
    log.info(
        "CPU limit %.2f CPUs (%s): the periods in which it stops this process are watched "
        "(batching, health checks, scaling, the idle spins)",
        limit,
        ", ".join(str(quota.folder) for quota in quotas),
    )
    return count


class ThrottleWatch:
    """When the process's CPU limit last stopped it: for the batcher, which batches more then,
    and for decisions that latency would mislead (the controller's slow workers and probe
    budgets, a rollout's latency watch): the kernel stops the serving process and every worker
    alike, so a worker or a version looks slow that is not. ``count``: a ThrottleCount, or None
    without a limit (then nothing is ever throttled). Each read that finds the count risen since
    the previous read records the time; a count that cannot be read any more is not read again."""

    def __init__(self, count: Callable[[], int | None] | None) -> None:
        self._count = count
        self._last: int | None = None
        self._seen = -math.inf  # time.monotonic() of the last read that found the count risen

    def periods(self, now: float | None = None) -> int | None:
        """The count of throttled periods so far, or None (no limit, or unreadable). ``now``:
        time.monotonic() if the caller has it."""
        if self._count is None:
            return None
        current = self._count()
        if current is None:
            log.warning("the CPU limit's throttle count cannot be read any more: not watched")
            self._count = None
            return None
        if self._last is not None and current > self._last:
            self._seen = time.monotonic() if now is None else now
        self._last = current
        return current

    def throttled_within(self, seconds: float, now: float | None = None) -> bool:
        """Whether a read in about the last ``seconds`` found the limit had stopped the
        process (this one included)."""
        now = time.monotonic() if now is None else now
        self.periods(now)
        return now - self._seen <= seconds


class SpinPause:
    """Whether a busy poll (a worker's idle spin, the serving loop's WARMSERVE_LOOP_SPIN) should
    pause because the CPU limit stopped the process lately: a poll spends the quota that the
    rest of the server is short of, so the whole server would wait in the kernel for the next
    period. ``watch``: the process's ThrottleWatch, or None (no limit: never paused). It asks
    the watch at most every ``check_s`` and stays paused for ``memory_s`` after the last stop it
    found. ``who`` names the poll in the log line of its first pause; ``clock``: monotonic
    seconds."""

    def __init__(
        self,
        watch: ThrottleWatch | None,
        who: str,
        check_s: float = SPIN_CHECK_S,
        memory_s: float = SPIN_THROTTLE_MEMORY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watch = watch
        self.who = who
        self.check_s = check_s
        self.memory_s = memory_s
        self._clock = clock
        self._asked = -math.inf  # the clock at the last look at the limit
        self.paused = False  # the limit stopped the process lately: no polling
        self.pauses = 0  # times polling paused for the limit (logged the first time)

    def __call__(self) -> bool:
        if self.watch is None:
            return False
        now = self._clock()
        if now - self._asked < self.check_s:
            return self.paused
        self._asked = now
        paused = self.watch.throttled_within(self.memory_s, now)
        if paused and not self.paused:
            self.pauses += 1
            log.log(
                logging.INFO if self.pauses == 1 else logging.DEBUG,
                "%s paused (%d times so far): the CPU limit stopped this process; it resumes "
                "%g s after the last stop",
                self.who,
                self.pauses,
                self.memory_s,
            )
        self.paused = paused
        return paused


@functools.cache
def throttle_watch() -> ThrottleWatch:
    """The process's ThrottleWatch (one, shared by every model)."""
    return ThrottleWatch(throttle_counter())
