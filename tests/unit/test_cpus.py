"""The CPUs a process may use: its affinity mask capped by its cgroup's CPU quota; and the
periods in which a quota stopped it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from serve import cpus
from serve.cpus import available_cpus
from serve.pool.pool import WorkerPool
from tests.unit.test_controller import _model

NODE_CPUS = 64


@pytest.fixture(autouse=True)
def node_of_64_cpus(monkeypatch):
    """A process allowed on all 64 CPUs of the node (as os.cpu_count() would say)."""
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(NODE_CPUS)))


@pytest.fixture(autouse=True)
def in_the_root_cgroup(monkeypatch, tmp_path_factory):
    """/proc/self/cgroup of a process in its namespace's root cgroup (not this machine's)."""
    proc = tmp_path_factory.mktemp("proc") / "cgroup"
    proc.write_text("0::/\n")
    monkeypatch.setattr(cpus, "PROC_SELF_CGROUP", proc, raising=False)


def _proc_cgroup(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cgroup").write_text(text)
    return folder / "cgroup"


def _cgroup_v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max)
    return root


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", NODE_CPUS),  # no limit
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # 1.5 CPUs: round up, the quota allows two busy threads
        ("50000 100000\n", 1),
        ("12800000 100000\n", NODE_CPUS),  # a limit above the cores: the cores
    ],
)
def test_a_cgroup_v2_limit_caps_the_cpus(tmp_path, cpu_max, expected):
    assert available_cpus(_cgroup_v2(tmp_path, cpu_max)) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"), [("-1", "100000", NODE_CPUS), ("400000", "100000", 4)]
)
def test_a_cgroup_v1_quota_caps_the_cpus(tmp_path, quota, period, expected):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    assert available_cpus(tmp_path) == expected


def test_without_a_cgroup_file_the_affinity_mask_decides(tmp_path, monkeypatch):
    assert available_cpus(tmp_path) == NODE_CPUS
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {3, 5, 7})  # taskset
    assert available_cpus(tmp_path) == 3
    assert available_cpus(_cgroup_v2(tmp_path / "limited", "100000 100000")) == 1


@pytest.mark.parametrize("cpu_max", ["garbage\n", "", "100000 0\n", "-5 100000\n"])
def test_an_unreadable_limit_is_ignored_and_said_so(tmp_path, caplog, cpu_max):
    with caplog.at_level(logging.WARNING, logger="serve.cpus"):
        assert available_cpus(_cgroup_v2(tmp_path, cpu_max)) == NODE_CPUS
    assert "unexpected CPU limit" in caplog.text and "ignoring it" in caplog.text


def _nested(root: Path, limits: dict[str, str]) -> Path:
    """A cgroup v2 tree under ``root``: folder (relative) → its cpu.max; no cpu.max at the
    root (the root cgroup has none)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for folder, cpu_max in limits.items():
        _cgroup_v2(root / folder, cpu_max)
    return root


LEAF = "kubepods.slice/pod1.slice/cri-c1.scope"


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({LEAF: "200000 100000\n"}, 2),  # the container's own cgroup, below the mount point
        ({"kubepods.slice/pod1.slice": "300000 100000\n", LEAF: "max 100000\n"}, 3),  # the pod
        ({"kubepods.slice": "800000 100000\n", LEAF: "300000 100000\n"}, 3),  # the tightest
        ({"kubepods.slice": "200000 100000\n", LEAF: "600000 100000\n"}, 2),  # an ancestor's
        ({"kubepods.slice": "100000 50000\n", LEAF: "250000 100000\n"}, 2),  # other periods
        ({"kubepods.slice": "max 100000\n", LEAF: "max 100000\n"}, NODE_CPUS),
        ({"other.slice": "100000 100000\n"}, NODE_CPUS),  # not on this process's path
    ],
)
def test_the_tightest_cpu_max_on_the_process_cgroup_path_caps_the_cpus(tmp_path, limits, expected):
    root = _nested(tmp_path / "cgroup", limits)
    proc = _proc_cgroup(tmp_path / "proc", f"0::/{LEAF}\n")
    assert available_cpus(root, proc) == expected


def test_a_malformed_limit_on_one_level_leaves_the_others_in_force(tmp_path, caplog):
    root = _nested(tmp_path / "cgroup", {"kubepods.slice": "4 CPUs\n", LEAF: "300000 100000\n"})
    proc = _proc_cgroup(tmp_path / "proc", f"0::/{LEAF}\n")
    with caplog.at_level(logging.WARNING, logger="serve.cpus"):
        assert available_cpus(root, proc) == 3
    assert "kubepods.slice/cpu.max; ignoring it" in caplog.text


def test_a_cgroup_path_outside_the_namespace_is_read_at_its_root_only(tmp_path):
    root = _nested(tmp_path / "cgroup", {"escaped": "100000 100000\n"})
    _cgroup_v2(root, "300000 100000\n")  # (a namespace's root cgroup shows its cpu.max)
    proc = _proc_cgroup(tmp_path / "proc", "0::/../../escaped\n")
    assert available_cpus(root, proc) == 3


def test_cgroup_v1_beside_the_unified_hierarchy_is_read_as_before(tmp_path):
    """Hybrid hosts: /proc/self/cgroup names a v2 path, but the cpu controller is v1's."""
    (tmp_path / "cgroup" / "cpu").mkdir(parents=True)
    (tmp_path / "cgroup" / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cgroup" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    proc = _proc_cgroup(tmp_path / "proc", "3:cpu,cpuacct:/\n0::/user.slice\n")
    assert available_cpus(tmp_path / "cgroup", proc) == 3


def test_without_proc_self_cgroup_the_root_is_read(tmp_path):
    root = _cgroup_v2(tmp_path / "cgroup", "200000 100000\n")
    assert available_cpus(root, tmp_path / "no-such-file") == 2


def test_a_pool_sizes_its_workers_threads_by_the_cpu_limit_not_the_node(tmp_path, monkeypatch):
    """A pod limited to 4 CPUs on a 64-core node: 2 workers get 2 intra-op threads each."""
    root = _nested(tmp_path / "cgroup", {LEAF: "400000 100000\n"})
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_SELF_CGROUP", _proc_cgroup(tmp_path / "proc", f"0::/{LEAF}\n"))
    assert WorkerPool(_model(workers=2, threads=0)).settings.threads == 2
    assert WorkerPool(_model(workers=2, threads=3)).settings.threads == 3  # the model's own


# Throttling: the quotas on the process's path and the periods in which they stopped it.


def _stat(folder: Path, throttled: int) -> None:
    (folder / "cpu.stat").write_text(f"usage_usec 9\nnr_periods 50\nnr_throttled {throttled}\n")


def test_every_quota_on_the_path_is_found_with_its_folder(tmp_path):
    root = _nested(tmp_path / "cgroup", {"kubepods.slice": "800000 100000\n", LEAF: "max 100000\n"})
    _cgroup_v2(root / "kubepods.slice/pod1.slice", "150000 100000\n")
    proc = _proc_cgroup(tmp_path / "proc", f"0::/{LEAF}\n")
    assert cpus.cpu_quotas(root, proc) == [
        cpus.Quota(root / "kubepods.slice", 8.0),
        cpus.Quota(root / "kubepods.slice/pod1.slice", 1.5),
    ]


def test_a_v1_host_cgroup_below_the_hierarchy_root_is_found(tmp_path):
    """A host (not a container) with cgroup v1: the process's cpu cgroup lies below the mount."""
    group = tmp_path / "cgroup" / "cpu" / "serving"
    group.mkdir(parents=True)
    (group.parent / "cpu.cfs_quota_us").write_text("-1\n")
    (group.parent / "cpu.cfs_period_us").write_text("100000\n")
    (group / "cpu.cfs_quota_us").write_text("50000\n")
    (group / "cpu.cfs_period_us").write_text("100000\n")
    proc = _proc_cgroup(tmp_path / "proc", "4:cpu:/serving\n1:name=systemd:/\n0::/\n")
    assert cpus.cpu_quotas(tmp_path / "cgroup", proc) == [cpus.Quota(group, 0.5)]
    assert available_cpus(tmp_path / "cgroup", proc) == 1


def test_the_throttled_periods_of_every_quota_on_the_path_add_up(tmp_path):
    pod, container = tmp_path / "pod", tmp_path / "container"
    for folder, throttled in ((pod, 4), (container, 7)):
        folder.mkdir()
        _stat(folder, throttled)
    count = cpus.ThrottleCount([cpus.Quota(pod, 2.0), cpus.Quota(container, 1.0)])
    assert count() == 11
    _stat(container, 9)
    assert count() == 13
    (pod / "cpu.stat").write_text("usage_usec 9\n")  # no nr_throttled (no cpu controller)
    assert count() is None
    (pod / "cpu.stat").unlink()
    assert count() is None


@pytest.mark.parametrize(
    ("stat", "expected"),
    [
        # cgroup v1: throttled_time in ns
        ("nr_periods 120\nnr_throttled 45\nthrottled_time 3500000000\n", (120, 45, 3.5)),
        # cgroup v2: throttled_usec, among the usage lines
        (
            "usage_usec 9\nuser_usec 5\nsystem_usec 4\nnr_periods 80\nnr_throttled 8\n"
            "throttled_usec 250000\nnr_bursts 0\nburst_usec 0\n",
            (80, 8, 0.25),
        ),
        ("usage_usec 9\n", None),  # no cpu controller's counts
    ],
)
def test_a_quotas_cpu_stat_reads_as_periods_throttled_and_time_stopped(tmp_path, stat, expected):
    (tmp_path / "cpu.stat").write_text(stat)
    found = cpus.read_limit(cpus.Quota(tmp_path, 0.5))
    if expected is None:
        assert found is None
    else:
        assert found == cpus.LimitStat(0.5, *expected)


def test_an_unreadable_cpu_stat_reads_as_nothing(tmp_path):
    assert cpus.read_limit(cpus.Quota(tmp_path / "gone", 1.0)) is None


def test_the_tightest_quota_is_the_one_with_the_fewest_cpus(tmp_path):
    pod, container = cpus.Quota(tmp_path / "pod", 4.0), cpus.Quota(tmp_path / "c", 1.5)
    assert cpus.tightest_quota([pod, container]) == container
    assert cpus.tightest_quota([]) is None


@pytest.fixture
def found_afresh():
    cpus.throttle_counter.cache_clear()
    yield
    cpus.throttle_counter.cache_clear()


def test_the_process_counter_watches_its_quotas_and_says_so(
    tmp_path, monkeypatch, caplog, found_afresh
):
    root = _nested(tmp_path / "cgroup", {LEAF: "50000 100000\n"})
    _stat(root / LEAF, 3)
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_SELF_CGROUP", _proc_cgroup(tmp_path / "proc", f"0::/{LEAF}\n"))
    with caplog.at_level(logging.INFO, logger="serve.cpus"):
        count = cpus.throttle_counter()
    assert count is not None and count() == 3
    assert "CPU limit 0.50 CPUs" in caplog.text
    assert cpus.throttle_counter() is count  # found once per process


def test_no_quota_or_an_unreadable_count_means_nothing_to_watch(
    tmp_path, monkeypatch, found_afresh
):
    root = _nested(tmp_path / "cgroup", {LEAF: "max 100000\n"})
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_SELF_CGROUP", _proc_cgroup(tmp_path / "proc", f"0::/{LEAF}\n"))
    assert cpus.throttle_counter() is None
    cpus.throttle_counter.cache_clear()
    _cgroup_v2(root / LEAF, "50000 100000\n")  # a quota, but its cpu.stat is missing
    assert cpus.throttle_counter() is None


CHILD = """
import time
from serve import cpus
count = cpus.throttle_counter()
first = count()
end = time.monotonic() + 0.6
while time.monotonic() < end:
    pass
stat = cpus.read_limit(cpus.tightest_quota(cpus.cpu_quotas()))
print(min(quota.cpus for quota in cpus.cpu_quotas()), first, count(), stat.throttled_s)
"""


def test_the_real_kernel_counts_the_periods_a_quota_stopped_a_busy_process(tmp_path):
    """Where this test may make a cgroup-v1 cpu group (root, a writable v1 cpu hierarchy)."""
    hierarchy = cpus.CGROUP_ROOT / "cpu"
    if not (hierarchy / "cgroup.procs").exists() or not os.access(hierarchy, os.W_OK):
        pytest.skip("no writable cgroup-v1 cpu hierarchy here")
    group = hierarchy / f"warmserve-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("20000")  # 0.2 CPU
        enter = f'echo $$ > {group}/cgroup.procs && exec {sys.executable} -c "$0"'
        done = subprocess.run(
            ["sh", "-c", enter, CHILD],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).parents[2],
        )
        assert done.returncode == 0, done.stderr
        limit, first, last, stopped_s = done.stdout.split()
        assert float(limit) == pytest.approx(0.2)
        assert int(last) > int(first)  # 0.6 s of spinning at 0.2 CPU: throttled most periods
        assert float(stopped_s) > 0.1  # stood stopped for most of those 0.6 s
    finally:
        group.rmdir()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_throttle_watch_remembers_when_a_read_found_the_count_risen(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(cpus.time, "monotonic", clock)
    counts = iter([5, 5, 6, 6, 6])
    watch = cpus.ThrottleWatch(lambda: next(counts))
    assert not watch.throttled_within(5.0)  # the first read: only the count
    clock.now += 1
    assert not watch.throttled_within(5.0)  # unchanged
    clock.now += 1
    assert watch.throttled_within(5.0)  # risen: throttled now
    clock.now += 4
    assert watch.throttled_within(5.0)  # 4 s ago
    clock.now += 2
    assert not watch.throttled_within(5.0)  # 6 s ago


def test_a_throttle_watch_without_a_limit_never_says_throttled():
    watch = cpus.ThrottleWatch(None)
    assert watch.periods() is None
    assert not watch.throttled_within(1e9)
    unreadable = cpus.ThrottleWatch(lambda: None)
    assert unreadable.periods() is None and not unreadable.throttled_within(1e9)


def test_a_busy_poll_pauses_for_the_cpu_limit_asks_at_most_every_check_and_logs_once(caplog):
    """SpinPause: paused while a look at the limit within ``memory_s`` found it had stopped the
    process; between looks (``check_s``) the last answer stands; the first pause is logged."""
    caplog.set_level(logging.DEBUG, logger="serve.cpus")
    clock, periods, reads = [50.0], [0], [0]

    def count() -> int:
        reads[0] += 1
        return periods[0]

    pause = cpus.SpinPause(
        cpus.ThrottleWatch(count), "a poll", check_s=0.05, memory_s=1.0, clock=lambda: clock[0]
    )
    assert pause() is False  # (learns the count)
    periods[0] = 1
    clock[0] = 50.01
    assert pause() is False and reads[0] == 1  # within check_s of the last look: not read
    clock[0] = 50.1
    assert pause() is True and reads[0] == 2
    clock[0] = 50.9
    assert pause() is True  # no new stop, but within memory_s of the last
    clock[0] = 51.2
    assert pause() is False  # a second and more since: polling again
    periods[0], clock[0] = 2, 51.3
    assert pause() is True
    assert pause.pauses == 2
    first = [r for r in caplog.records if "a poll paused (1 times" in r.getMessage()]
    second = [r for r in caplog.records if "a poll paused (2 times" in r.getMessage()]
    assert [r.levelno for r in first] == [logging.INFO]
    assert [r.levelno for r in second] == [logging.DEBUG]
    assert cpus.SpinPause(None, "no limit")() is False
