"""The CPUs a process may use: its affinity mask capped by its cgroup's CPU quota."""

from __future__ import annotations

import logging
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
def test_an_unreadable_limit_falls_back_to_the_affinity_mask_and_says_so(tmp_path, caplog, cpu_max):
    with caplog.at_level(logging.WARNING, logger="serve.cpus"):
        assert available_cpus(_cgroup_v2(tmp_path, cpu_max)) == NODE_CPUS
    assert "using the affinity mask" in caplog.text


def test_a_pool_sizes_its_workers_threads_by_the_cpu_limit_not_the_node(tmp_path, monkeypatch):
    """A pod limited to 4 CPUs on a 64-core node: 2 workers get 2 intra-op threads each."""
    monkeypatch.setattr(cpus, "CGROUP_ROOT", _cgroup_v2(tmp_path, "400000 100000\n"))
    assert WorkerPool(_model(workers=2, threads=0)).settings.threads == 2
    assert WorkerPool(_model(workers=2, threads=3)).settings.threads == 3  # the model's own
