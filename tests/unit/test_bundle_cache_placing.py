"""The bundle cache's placing locks (``<id>.placing``): none is left behind for good."""

from __future__ import annotations

import fcntl
import os

from serve.bundles.cache import PLACING_SUFFIX, BundleCache

ID = "ab" * 32


def test_a_placing_lock_left_by_a_process_that_died_is_collected(tmp_path):
    # A process killed while it placed an entry leaves its lock file (the kernel releases the
    # lock, not the file); a collection removes it as it removes the entry it belonged to.
    cache = BundleCache(tmp_path)
    leftover = tmp_path / f"{ID}{PLACING_SUFFIX}"
    leftover.touch()
    cache.collect(())
    assert not leftover.exists()


def test_a_placing_lock_held_by_another_process_is_kept(tmp_path):
    cache = BundleCache(tmp_path)
    lock = tmp_path / f"{ID}{PLACING_SUFFIX}"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)  # (another open file: flock conflicts as across
    try:  # processes)
        fcntl.flock(fd, fcntl.LOCK_EX)
        cache.collect(())
        assert lock.exists()
    finally:
        os.close(fd)
    with cache.placing(ID):  # (free again: taken, and removed on the way out)
        assert lock.exists()
    assert not lock.exists()
