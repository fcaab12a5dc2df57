"""Single-file bundles: a deterministic gzip-compressed tar of the bundle directory.

Entries are sorted, owned by 0:0, dated 0, mode 0644/0755, so the same bundle always gives the
same archive bytes. Extraction accepts regular files and directories under the root only, and
the extracted directory is verified like any other bundle before it is used.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import zlib
from pathlib import Path

from serve.bundles.cache import STAGING_PREFIX, BundleCache
from serve.bundles.manifest import MANIFEST_FILE, bundle_id
from serve.bundles.verify import (
    VerifiedBundle,
    list_files,
    verify_bundle,
    verify_bundle_again,
)
from serve.errors import InvalidBundleError

SUFFIX = ".wsb"

log = logging.getLogger(__name__)

# archive path → (its stat, its bundle id): reading an archive's id decompresses all of it
_identities: dict[Path, tuple[tuple[int, int, int, int], str]] = {}
_identities_lock = threading.Lock()


def write_archive(bundle: Path, archive: Path) -> Path:
    verify_bundle(bundle)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in [MANIFEST_FILE, *list_files(bundle)]:
            data = (bundle / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    with (
        archive.open("wb") as stream,
        gzip.GzipFile(filename="", fileobj=stream, mode="wb", mtime=0) as gz,
    ):
        gz.write(raw.getvalue())
    return archive


def extract_archive(archive: Path, cache: BundleCache) -> VerifiedBundle:
    """Unpack into ``cache/<bundle id>`` (once) and verify it. A copy there that no longer
    verifies (changed on disk) is replaced by a fresh one from the archive. The entry is held
    for this process (see ``BundleCache``) from before it is looked at. An archive this
    process has read before, untouched since, and its unpacked copy, untouched since verified,
    are not read again (``verify_bundle_again``)."""
    known = _known_identity(archive)
    if known is not None:
        cache.hold(known)
        if cache.path(known).is_dir():
            try:
                return verify_bundle_again(cache.path(known), known)
            except InvalidBundleError as exc:
                log.warning("%s: unpacking it again: the cached copy is refused: %s", archive, exc)
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            stat = _stat(archive)
            identity = _identity(tar, archive)
            with _identities_lock:
                _identities[archive.resolve()] = (stat, identity)
            cache.hold(identity)
            target = cache.path(identity)
            if target.is_dir() and known is None:
                try:
                    return verify_bundle_again(target, identity)
                except InvalidBundleError as exc:
                    log.warning(
                        "%s: unpacking it again: the cached copy is refused: %s", archive, exc
                    )
            try:
                _unpack(tar, cache.root, target)
            except gzip.BadGzipFile:
                raise
            except OSError as exc:  # (the cache's disk, not the archive: full, read-only)
                raise InvalidBundleError(
                    f"{archive}: could not unpack it into the bundle cache {cache.root}: {exc}"
                ) from None
    except (tarfile.TarError, OSError, KeyError, EOFError, zlib.error) as exc:
        # (EOFError, zlib.error: a gzip stream cut short or damaged, as of a half-copied file)
        raise InvalidBundleError(f"{archive}: not a readable bundle archive: {exc}") from None
    return verify_bundle_again(target, identity)


def _stat(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _known_identity(archive: Path) -> str | None:
    """The bundle id of ``archive`` if this process read it and it has not changed since."""
    try:
        stat, path = _stat(archive), archive.resolve()
    except OSError:
        return None
    with _identities_lock:
        known = _identities.get(path)
    return known[1] if known is not None and known[0] == stat else None


def forget_identities(keep: set[Path]) -> None:
    """Drop what is remembered of archives not in ``keep`` (resolved paths)."""
    with _identities_lock:
        for path in [p for p in _identities if p not in keep]:
            del _identities[path]


def _identity(tar: tarfile.TarFile, archive: Path) -> str:
    """The bundle id, once every entry is known to be a plain file or directory under the root."""
    for member in tar.getmembers():
        path = Path(member.name)
        if not (member.isfile() or member.isdir()) or path.is_absolute() or ".." in path.parts:
            raise InvalidBundleError(f"{archive}: unsafe entry {member.name!r}")
    manifest = tar.extractfile(MANIFEST_FILE)
    if manifest is None:
        raise InvalidBundleError(f"{archive}: no {MANIFEST_FILE}")
    return bundle_id(manifest.read())


def _unpack(tar: tarfile.TarFile, cache: Path, target: Path) -> None:
    """Unpack beside ``target`` and rename into place, so no one sees a half-written bundle."""
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=cache))
    try:
        tar.extractall(staging / "bundle", filter="data")
        if target.is_dir():  # a copy that failed verification: set aside in one step
            target.rename(staging / "refused")
        try:
            (staging / "bundle").rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # another process (a second server, `warmserve bundle verify`) unpacked it first;
            # the caller verifies that copy like its own
    finally:
        shutil.rmtree(staging, ignore_errors=True)
