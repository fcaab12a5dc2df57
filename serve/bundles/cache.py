"""The unpacked-bundle cache: ``<root>/<bundle id>`` folders unpacked from ``.wsb`` archives,
possibly shared by several processes (servers with other repositories, ``warmserve bundle
verify``).

A process holds a shared ``flock`` on ``<root>/<bundle id>.lock`` (beside the entry: a file
inside would fail its verification) for every entry it uses, from before it is unpacked or
verified until it no longer uses it. ``collect`` removes every entry this process does not use
whose lock it can take exclusively, i.e. that no other process holds: the kernel releases the
locks of a process that dies, so a crashed server keeps nothing. Unpacking leftovers
(``.extract-*`` of a process killed mid-unpack) go once they are older than an hour.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
PLACING_SUFFIX = ".placing"  # locked (exclusively) while an entry is put in place or replaced
PLACING_WAIT_S = 600.0  # how long one waits for another process placing the same entry
PLACING_POLL_S = 0.05
STAGING_PREFIX = ".extract-"
STAGING_MAX_AGE_S = 3600.0  # an unpack in progress is younger than this
_ENTRY = re.compile(r"[0-9a-f]{64}")  # a bundle id (sha256 hex)


class BundleCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._held: dict[str, int] = {}  # bundle id → descriptor holding its shared lock
        self._mutex = threading.Lock()  # scans run in worker threads

    def path(self, bundle_id: str) -> Path:
        return self.root / bundle_id

    def hold(self, bundle_id: str) -> None:
        """Mark ``bundle_id`` as used by this process (before unpacking or verifying it), so
        no process removes it. Waits only while a collector removes that very entry."""
        with self._mutex:
            if bundle_id in self._held:
                return
            self.root.mkdir(parents=True, exist_ok=True)
            fd = _locked(self._lock_path(bundle_id), fcntl.LOCK_SH)
            if fd is None:  # (not non-blocking: it waits rather than fails)
                raise OSError(f"{self._lock_path(bundle_id)}: shared lock refused")
            self._held[bundle_id] = fd

    @contextlib.contextmanager
    def placing(self, bundle_id: str) -> Iterator[None]:
        """Exclusive, across processes and threads, while ``bundle_id``'s entry is put in place
        or a refused copy of it replaced: two of them replacing one copy at once would each
        move the other's fresh copy aside. Waits up to PLACING_WAIT_S (then OSError); the lock
        file is removed on the way out (a waiter then retries on a new one: ``_locked``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / f"{bundle_id}{PLACING_SUFFIX}"
        deadline = time.monotonic() + PLACING_WAIT_S
        logged = False
        while (fd := _locked(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)) is None:
            if time.monotonic() > deadline:
                raise OSError(
                    f"{lock}: another process has been placing it over {PLACING_WAIT_S:.0f} s"
                )
            if not logged:
                log.info("bundle cache: waiting for another process placing %s", bundle_id)
                logged = True
            time.sleep(PLACING_POLL_S)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            os.close(fd)

    def held(self) -> set[str]:
        with self._mutex:
            return set(self._held)

    def collect(self, in_use: Iterable[str]) -> None:
        """Release every entry not in ``in_use``, then remove each entry that no process holds
        (and old unpacking leftovers). Failures are logged: the cache is then only bigger."""
        keep = set(in_use)
        with self._mutex:
            for bundle_id in [b for b in self._held if b not in keep]:
                os.close(self._held.pop(bundle_id))
            try:
                children = sorted(self.root.iterdir()) if self.root.is_dir() else []
            except OSError as exc:
                log.warning("bundle cache: cannot list %s: %s", self.root, exc)
                return
            entries: set[str] = set()
            for child in children:
                name = child.name.removesuffix(LOCK_SUFFIX)
                if child.name.startswith(STAGING_PREFIX):
                    self._remove_staging(child)
                elif child.name.endswith(PLACING_SUFFIX):
                    self._remove_placing(child)
                elif _ENTRY.fullmatch(name) and name not in keep and name not in self._held:
                    entries.add(name)
            for bundle_id in sorted(entries):
                self._remove_entry(bundle_id)

    def close(self) -> None:
        """Release every entry (the process stops using the cache)."""
        with self._mutex:
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()

    def _lock_path(self, bundle_id: str) -> Path:
        return self.root / f"{bundle_id}{LOCK_SUFFIX}"

    def _remove_entry(self, bundle_id: str) -> None:
        entry, lock = self.path(bundle_id), self._lock_path(bundle_id)
        try:
            fd = _locked(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:
                log.debug("bundle cache: %s is in use by another process", bundle_id)
                return
            try:
                unpacked, size = entry.is_dir(), _size(entry)
                if unpacked:
                    shutil.rmtree(entry)
                lock.unlink()  # a process waiting on this lock file retries on the new one
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("bundle cache: could not remove %s: %s", entry, exc)
            return
        if unpacked:
            log.info("bundle cache: removed %s (%.1f MiB), used by no server", entry, size / 2**20)

    @staticmethod
    def _remove_placing(lock: Path) -> None:
        """A placing lock file no process holds: left by one that died while placing (the
        kernel released its lock, not its file). Removed as ``placing`` removes its own (a
        process waiting on it retries on a new file: ``_locked``)."""
        try:
            fd = _locked(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:
                return  # being placed right now
            try:
                lock.unlink()
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("bundle cache: could not remove %s: %s", lock, exc)
            return
        log.info("bundle cache: removed %s, left by a process that died while placing", lock)

    @staticmethod
    def _remove_staging(staging: Path) -> None:
        try:
            age = time.time() - staging.stat().st_mtime
            if age < STAGING_MAX_AGE_S:
                return  # perhaps being unpacked right now
            size = _size(staging)
            shutil.rmtree(staging)
        except OSError as exc:
            log.warning("bundle cache: could not remove %s: %s", staging, exc)
            return
        log.info(
            "bundle cache: removed %s (%.1f MiB), left by an unpack that did not finish "
            "%.0f min ago",
            staging,
            size / 2**20,
            age / 60,
        )


def _locked(lock: Path, operation: int) -> int | None:
    """A descriptor of ``lock`` holding ``operation``; None when it is non-blocking and held.

    A collector unlinks the lock file of an entry it removed: a process that opened the file
    before that holds a lock on a file no longer there, so it checks and retries on the file
    now at that path."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, operation)
            opened, current = os.fstat(fd), os.stat(lock)
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:  # unlinked between flock and stat
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
            return fd
        os.close(fd)


def _size(path: Path) -> int:
    """The bytes of the files under ``path`` (0 if it is gone)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue
    return total
