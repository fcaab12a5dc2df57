"""The server tree's CPU time (make bench's CPU per call): a child that ends between two readings
keeps its CPU time in the tree, through its parent's reaped-children time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.proctree import tree_cpu_seconds

BURN = "import os, sys\nwhile not os.path.exists(sys.argv[1]): pass\n"  # spins until told


def own_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_child_that_ends_mid_run_keeps_its_cpu_time_in_the_tree(tmp_path):
    stop = tmp_path / "stop"
    # the parent: a shell that starts a spinning child, reaps it when it ends, and lives on
    parent = subprocess.Popen(
        ["sh", "-c", f'{sys.executable} -c "$0" "$1"; read line', BURN, str(stop)],
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        child = 0
        while time.monotonic() < deadline and not child:
            children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
            child = int(children[0]) if children else 0
            time.sleep(0.01)
        assert child, "the spinning child never started"
        while own_cpu(child) < 0.3:  # it has burnt 0.3 s of CPU (it spins: it gets there)
            assert time.monotonic() < deadline, "the child never used CPU"
            time.sleep(0.01)
        before = tree_cpu_seconds(parent.pid)
        assert before >= 0.3
        stop.touch()  # the child ends; the shell reaps it and waits for a line
        while os.path.exists(f"/proc/{child}"):
            assert time.monotonic() < deadline, "the child did not end"
            time.sleep(0.01)
        after = tree_cpu_seconds(parent.pid)
        assert after >= before  # the ended child's time stays in the tree, it is not taken off
        assert after >= 0.3
    finally:
        parent.kill()
        parent.wait(10)
