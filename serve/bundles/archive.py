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
    verifies (changed on disk) is replaced by a fresh one from the archive; of several
    processes (or threads) replacing it at once, the first puts its copy in place and the
    others use that one once it verifies. The entry is held for this process (see
    ``BundleCache``) from before it is looked at. An archive this process has read before,
    untouched since, and its unpacked copy, untouched since verified, are not read again
    (``verify_bundle_again``)."""
    known = _known_identity(archive)
    refused: tuple[Path, _Folder] | None = None  # the copy found refused, as it was
    if known is not None:
        _hold(cache, known, archive)
        target = cache.path(known)
        bundle, seen = _cached(archive, target, known)
        if bundle is not None:
            return bundle
        refused = (target, seen)
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            stat = _stat(archive)
            identity = _identity(tar, archive)
            with _identities_lock:
                _identities[archive.resolve()] = (stat, identity)
            _hold(cache, identity, archive)
            target = cache.path(identity)
            if refused is None or refused[0] != target:
                bundle, seen = _cached(archive, target, identity)
                if bundle is not None:
                    return bundle
                refused = (target, seen)
            try:
                return _unpack(tar, cache, identity, refused[1])
            except gzip.BadGzipFile:
                raise
            except OSError as exc:  # (the cache's disk, not the archive: full, read-only)
                raise InvalidBundleError(
                    f"{archive}: could not unpack it into the bundle cache {cache.root}: {exc}"
                ) from None
    except (tarfile.TarError, OSError, KeyError, EOFError, zlib.error) as exc:
        # (EOFError, zlib.error: a gzip stream cut short or damaged, as of a half-copied file)
        raise InvalidBundleError(f"{archive}: not a readable bundle archive: {exc}") from None


def _hold(cache: BundleCache, identity: str, archive: Path) -> None:
    """``cache.hold``, its failures (the cache folder cannot be made or locked: a file in its
    place, a read-only disk) named as the cache's, not as the archive's."""
    try:
        cache.hold(identity)
    except OSError as exc:
        raise InvalidBundleError(
            f"{archive}: the bundle cache {cache.root} cannot be used (WARMSERVE_CACHE_DIR): {exc}"
        ) from None


# a folder as it is on disk now (device, inode), None when there is none: a copy put in place
# since is another folder
_Folder = tuple[int, int] | None


def _folder(path: Path) -> _Folder:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _cached(archive: Path, target: Path, identity: str) -> tuple[VerifiedBundle | None, _Folder]:
    """The unpacked copy at ``target`` if there is one and it verifies, and the folder found
    there (taken before it is verified: one put there meanwhile is another, never the one
    refused)."""
    seen = _folder(target)
    if seen is None:
        return None, None
    try:
        return verify_bundle_again(target, identity), seen
    except InvalidBundleError as exc:
        log.warning("%s: unpacking it again: the cached copy is refused: %s", archive, exc)
        return None, seen


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


def _unpack(
    tar: tarfile.TarFile, cache: BundleCache, identity: str, refused: _Folder
) -> VerifiedBundle:
    """Unpack into a private folder, then put it in place in one rename, so no one sees a
    half-written bundle. ``refused``: the copy this caller found at the entry and refused
    (None: there was none). Only that copy is replaced; one another process put there since
    is used instead of this one, once it verifies."""
    target = cache.path(identity)
    cache.root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=cache.root))
    try:
        tar.extractall(staging / "bundle", filter="data")
        with cache.placing(identity):
            there = _folder(target)
            if there is not None and there != refused:  # another's copy, put there since
                try:
                    return verify_bundle_again(target, identity)
                except InvalidBundleError as exc:
                    log.warning("%s: replacing a copy refused: %s", target, exc)
            if there is not None:  # a copy that failed verification: set aside in one step
                target.rename(staging / "refused")
            (staging / "bundle").rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return verify_bundle_again(target, identity)
