"""Single-file bundles: a deterministic gzip-compressed tar of the bundle directory.

Entries are sorted, owned by 0:0, dated 0, mode 0644/0755, so the same bundle always gives the
same archive bytes. Extraction accepts regular files and directories under the root only, and
the extracted directory is verified like any other bundle before it is used.
"""

from __future__ import annotations

import gzip
import io
import logging
import shutil
import tarfile
import tempfile
from pathlib import Path

from serve.bundles.cache import STAGING_PREFIX, BundleCache
from serve.bundles.manifest import MANIFEST_FILE, bundle_id
from serve.bundles.verify import VerifiedBundle, list_files, verify_bundle
from serve.errors import InvalidBundleError

SUFFIX = ".wsb"

log = logging.getLogger(__name__)


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
    for this process (see ``BundleCache``) from before it is looked at."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            identity = _identity(tar, archive)
            cache.hold(identity)
            target = cache.path(identity)
            if target.is_dir():
                try:
                    return verify_bundle(target, identity)
                except InvalidBundleError as exc:
                    log.warning(
                        "%s: unpacking it again: the cached copy is refused: %s", archive, exc
                    )
            _unpack(tar, cache.root, target)
    except (tarfile.TarError, OSError, KeyError) as exc:
        raise InvalidBundleError(f"{archive}: not a readable bundle archive: {exc}") from None
    return verify_bundle(target, identity)


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
