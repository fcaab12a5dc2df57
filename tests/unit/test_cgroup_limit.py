"""Finding the process's CPU limit (serve/batching/cgroup.py): cgroup v2 and v1 layouts, a
container that sees its own cgroup as the root, no limit, and (where this test may make a
cgroup) the real kernel's throttle count."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from serve.batching.cgroup import CpuLimit

V2_STAT = "usage_usec 100\nnr_periods 40\nnr_throttled 7\nthrottled_usec 9000\n"
V1_STAT = "nr_periods 40\nnr_throttled 3\nthrottled_time 900000\n"


def fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo.replace("ROOT", str(tmp_path)))
    return proc


def write(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)
    return folder


V2_MOUNT = "30 23 0:26 / ROOT/sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_cgroup_v2_quota_and_throttled_periods(tmp_path):
    folder = write(
        tmp_path / "sys/fs/cgroup/kubepods.slice/pod1/ctr",
        cpu_max="150000 100000\n",
        cpu_stat=V2_STAT,
    )
    proc = fake_proc(tmp_path, "0::/kubepods.slice/pod1/ctr\n", V2_MOUNT)
    limit = CpuLimit.find(proc)
    assert limit == CpuLimit(1.5, folder / "cpu.stat")
    assert limit.throttled_periods() == 7


def test_cgroup_v2_without_a_quota_is_no_limit(tmp_path):
    write(tmp_path / "sys/fs/cgroup/app", cpu_max="max 100000\n", cpu_stat=V2_STAT)
    proc = fake_proc(tmp_path, "0::/app\n", V2_MOUNT)
    assert CpuLimit.find(proc) is None


def test_a_container_that_sees_its_cgroup_mounted_as_the_root(tmp_path):
    # The container's own cgroup is mounted at /sys/fs/cgroup, while /proc/self/cgroup still
    # names the host's path for it.
    write(tmp_path / "sys/fs/cgroup", cpu_max="50000 100000\n", cpu_stat=V2_STAT)
    mount = "30 23 0:26 /kubepods/pod1/ctr ROOT/sys/fs/cgroup ro - cgroup2 cgroup2 rw\n"
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n", mount)
    limit = CpuLimit.find(proc)
    assert limit is not None and limit.cpus == 0.5


def test_cgroup_v1_cpu_controller_beside_an_empty_v2_hierarchy(tmp_path):
    write(tmp_path / "sys/fs/cgroup/unified/docker/abc", cpu_stat="usage_usec 5\n")  # no cpu
    folder = write(
        tmp_path / "sys/fs/cgroup/cpu,cpuacct/docker/abc",
        cpu_cfs_quota_us="200000\n",
        cpu_cfs_period_us="100000\n",
        cpu_stat=V1_STAT,
    )
    mounts = (
        "40 31 0:38 / ROOT/sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "32 31 0:29 / ROOT/sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "33 31 0:30 / ROOT/sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    )
    cgroups = "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/docker/abc\n"
    limit = CpuLimit.find(fake_proc(tmp_path, cgroups, mounts))
    assert limit == CpuLimit(2.0, folder / "cpu.stat")
    assert limit.throttled_periods() == 3


def test_cgroup_v1_unlimited_quota_is_no_limit(tmp_path):
    write(
        tmp_path / "sys/fs/cgroup/cpu",
        cpu_cfs_quota_us="-1\n",
        cpu_cfs_period_us="100000\n",
        cpu_stat=V1_STAT,
    )
    mount = "32 31 0:29 / ROOT/sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    assert CpuLimit.find(fake_proc(tmp_path, "1:cpu:/\n", mount)) is None


def test_a_mount_point_with_a_space_escaped_in_mountinfo(tmp_path):
    write(tmp_path / "my cgroups/app", cpu_max="100000 100000\n", cpu_stat=V2_STAT)
    mount = "30 23 0:26 / ROOT/my\\040cgroups rw - cgroup2 cgroup2 rw\n"
    limit = CpuLimit.find(fake_proc(tmp_path, "0::/app\n", mount))
    assert limit is not None and limit.cpus == 1.0


def test_unreadable_or_missing_files_are_no_limit(tmp_path):
    (tmp_path / "proc").mkdir()
    assert CpuLimit.find(tmp_path / "proc") is None  # no /proc/self/cgroup
    write(tmp_path / "sys/fs/cgroup/app", cpu_max="100000 100000\n")  # quota, but no cpu.stat
    assert CpuLimit.find(fake_proc(tmp_path, "0::/app\n", V2_MOUNT)) is None


def test_a_stat_file_that_went_away_reads_as_none(tmp_path):
    assert CpuLimit(1.0, tmp_path / "gone" / "cpu.stat").throttled_periods() is None


CHILD = textwrap.dedent(
    """
    import time
    from serve.batching.cgroup import CpuLimit
    limit = CpuLimit.find()
    first = limit.throttled_periods()
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        pass
    print(limit.cpus, first, limit.throttled_periods())
    """
)


def test_the_real_kernel_counts_the_periods_a_quota_stopped_a_busy_process():
    """Where this test may make a cgroup-v1 cpu group (root, a writable cpu hierarchy)."""
    hierarchy = Path("/sys/fs/cgroup/cpu")
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
        cpus, first, last = done.stdout.split()
        assert float(cpus) == pytest.approx(0.2)
        assert int(last) > int(first)  # 0.6 s of spinning at 0.2 CPU: throttled most periods
    finally:
        group.rmdir()
