"""Single-file bundles: a deterministic gzip-compressed tar of the bundle directory.

Entries are sorted, owned by 0:0, dated 0, mode 0644/0755, so the same bundle always gives the
same archive bytes. Extraction accepts regular files and directories under the root only, and
the extracted directory is verified like any other bundle before it is used.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import tempfile
from pathlib import Path

from serve.bundles.manifest import MANIFEST_FILE, bundle_id
from serve.bundles.verify import VerifiedBundle, list_files, verify_bundle
from serve.errors import InvalidBundleError

SUFFIX = ".wsb"


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


def extract_archive(archive: Path, cache: Path) -> VerifiedBundle:
    """Unpack into ``cache/<bundle id>`` (once) and verify it."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                path = Path(member.name)
                if (
                    not (member.isfile() or member.isdir())
                    or path.is_absolute()
                    or ".." in path.parts
                ):
                    raise InvalidBundleError(f"{archive}: unsafe entry {member.name!r}")
            manifest = tar.extractfile(MANIFEST_FILE)
            if manifest is None:
                raise InvalidBundleError(f"{archive}: no {MANIFEST_FILE}")
            identity = bundle_id(manifest.read())
            target = cache / identity
            if not target.is_dir():
                cache.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
                try:
                    tar.extractall(staging, filter="data")
                    staging.rename(target)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, OSError, KeyError) as exc:
        raise InvalidBundleError(f"{archive}: not a readable bundle archive: {exc}") from None
    return verify_bundle(target, identity)
