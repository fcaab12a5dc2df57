"""Large buffers allocated and freed call after call come back from the heap without page
faults once the process keeps them (serve/memory.py). Each case runs in a fresh interpreter:
the setting is for the whole process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# 32 live 256 KiB buffers per round, all freed, as a batch of image-sized requests would be
CHURN = """
import resource, sys
from serve.memory import keep_large_buffers_in_heap
tuned = keep_large_buffers_in_heap()
source = b"x" * (256 << 10)
def one_round():
    held = [bytes(bytearray(source)) for _ in range(32)]
    del held
for _ in range(3):
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    one_round()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_round(tuning: str) -> tuple[bool, float]:
    env = {**os.environ, "WARMSERVE_MALLOC_TUNING": tuning}
    command = [sys.executable, "-c", CHURN]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=True)
    out = done.stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_buffers_are_reused_without_page_faults():
    tuned, faults = _faults_per_round("1")
    default, default_faults = _faults_per_round("0")
    assert tuned and not default
    pages_per_round = 32 * (256 << 10) // 4096
    assert default_faults > pages_per_round / 2  # glibc's defaults: the pages come back fresh
    assert faults < pages_per_round / 20  # kept: almost none
