"""Verification of a bundle directory before any of its code is imported or weights are read."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import msgspec

from serve.bundles.manifest import FORMAT, MANIFEST_FILE, Manifest, bundle_id, decode, is_canonical
from serve.config import ModelConfig, explain_validation_error, model_files, validate_model
from serve.errors import InvalidBundleError

CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    path: Path
    id: str
    manifest: Manifest

    @property
    def model(self) -> ModelConfig:
        """The model configuration, pointing at this bundle's directory."""
        return msgspec.structs.replace(self.manifest.model, directory=str(self.path))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root: Path) -> list[str]:
    """Every file under ``root`` except the manifest, as sorted relative paths.

    Raises InvalidBundleError for anything that is not a regular file or directory (symlinks
    could point outside the bundle, where no hash covers them).
    """
    found: list[str] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise InvalidBundleError(f"bundle {root}: {relative} is a symbolic link")
        if path.is_file():
            if relative != MANIFEST_FILE:
                found.append(relative)
        elif not path.is_dir():
            raise InvalidBundleError(f"bundle {root}: {relative} is not a regular file")
    return found


def verify_bundle(root: Path, expected_id: str = "") -> VerifiedBundle:
    """Check the manifest is canonical and every file is present, unchanged and accounted for.

    Raises InvalidBundleError naming the first file that differs.
    """
    return read_bundle(root, expected_id, ())[0]


def read_bundle(
    root: Path, expected_id: str, keep: tuple[str, ...]
) -> tuple[VerifiedBundle, dict[str, bytes]]:
    """``verify_bundle``, also returning the bytes of the files named in ``keep`` (relative
    paths; those the manifest lists) as they were hashed. A loader that uses these bytes, not
    the files again, loads exactly what was verified: a file replaced or rewritten after the
    check is never used unchecked. Each kept file is read once."""
    root = root.resolve()
    manifest_path = root / MANIFEST_FILE
    if root.exists() and not root.is_dir():
        raise InvalidBundleError(f"bundle {root}: not a bundle (a directory with {MANIFEST_FILE})")
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise InvalidBundleError(f"bundle {root}: no {MANIFEST_FILE}") from None
    except OSError as exc:  # (unreadable: a permission, a directory of that name)
        raise InvalidBundleError(
            f"bundle {root}: cannot read {MANIFEST_FILE}: {exc.strerror or exc}"
        ) from None
    try:
        manifest = decode(raw)
    except msgspec.ValidationError as exc:  # (valid JSON: only its contents are wrong)
        why = explain_validation_error(exc, msgspec.json.decode(raw))
        raise InvalidBundleError(f"bundle {root}: {MANIFEST_FILE} is invalid: {why}") from None
    except msgspec.DecodeError as exc:
        raise InvalidBundleError(f"bundle {root}: {MANIFEST_FILE} is invalid: {exc}") from None
    if manifest.model.directory:  # (replaced by where the bundle lies: it would be ignored)
        raise InvalidBundleError(
            f"bundle {root}: {MANIFEST_FILE}: model.directory must be empty (a bundle does not "
            f"know where it lies), got {manifest.model.directory!r}"
        )
    if manifest.format != FORMAT:
        raise InvalidBundleError(f"bundle {root}: format {manifest.format}, expected {FORMAT}")
    if not is_canonical(raw):
        raise InvalidBundleError(f"bundle {root}: {MANIFEST_FILE} is not in canonical form")
    identity = bundle_id(raw)
    if expected_id and identity != expected_id:
        raise InvalidBundleError(
            f"bundle {root}: id {identity[:12]} is not the expected {expected_id[:12]}"
        )
    listed = {entry.path: entry for entry in manifest.files}
    present = set(list_files(root))
    for path in sorted(set(listed) - present):
        raise InvalidBundleError(f"bundle {root}: file {path} is missing")
    for path in sorted(present - set(listed)):
        raise InvalidBundleError(f"bundle {root}: file {path} is not in the manifest")
    wanted = {Path(name).as_posix() for name in keep if name}
    contents: dict[str, bytes] = {}
    for path, entry in sorted(listed.items()):
        file = root / path
        if path in wanted:
            data = _read_checked(file, entry.size)
            matches = data is not None and hashlib.sha256(data).hexdigest() == entry.sha256
            if data is not None:
                contents[path] = data
        else:
            matches = file.stat().st_size == entry.size and sha256_file(file) == entry.sha256
        if not matches:
            raise InvalidBundleError(f"bundle {root}: file {path} does not match its sha256")
    for label, name in model_files(manifest.model).items():
        if name and Path(name).as_posix() not in listed:  # "../x.py": no hash would cover it
            raise InvalidBundleError(f"bundle {root}: {label} {name!r} is not a file of the bundle")
    bundle = VerifiedBundle(root, identity, manifest)
    validate_model(bundle.model)
    return bundle, contents


def _read_checked(file: Path, size: int) -> bytes | None:
    """The bytes of ``file`` if it holds exactly ``size`` bytes (None otherwise), read once
    from one open descriptor: a file grown or shrunk meanwhile is not read past its size."""
    with file.open("rb") as stream:
        if os.fstat(stream.fileno()).st_size != size:
            return None
        data = stream.read(size + 1)
    return data if len(data) == size else None


# (path, size, mtime, ctime, inode) of every file under a bundle: any write to a file changes
# its ctime (which no tool can set back), so an unchanged fingerprint means unchanged bytes.
Fingerprint = tuple[tuple[str, int, int, int, int], ...]
_verified: dict[tuple[Path, str], tuple[Fingerprint, VerifiedBundle]] = {}
_verified_lock = threading.Lock()


def fingerprint(root: Path) -> Fingerprint:
    """The stat of every entry under ``root`` (not following links), in a stable order."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]):
            path = os.path.join(folder, name)
            st = os.lstat(path)
            relative = os.path.relpath(path, root)
            found.append((relative, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(found)


def verify_bundle_again(root: Path, expected_id: str = "") -> VerifiedBundle:
    """``verify_bundle``, without hashing again a bundle this process verified whose files have
    not been touched since (same fingerprint): a model-control load scans the whole repository,
    and hashing every bundle's weights each time made loads slow. For repository scans only:
    a worker verifies its bundle in full (``verify_bundle``) before it loads anything."""
    root = root.resolve()
    key = (root, expected_id)
    try:
        before = fingerprint(root)
    except OSError:
        before = ()
    with _verified_lock:
        known = _verified.get(key)
    if known is not None and before and known[0] == before:
        return known[1]
    bundle = verify_bundle(root, expected_id)  # (taken before: a change meanwhile re-verifies)
    with _verified_lock:
        if before:
            _verified[key] = (before, bundle)
    return bundle


def forget_verified(keep: set[Path]) -> None:
    """Drop what is remembered of bundles not under ``keep`` (gone from the repository)."""
    with _verified_lock:
        for key in [k for k in _verified if k[0] not in keep]:
            del _verified[key]
