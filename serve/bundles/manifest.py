"""The bundle manifest: the model's configuration, every file with its sha256, the frameworks it
was built with. Stored as canonical JSON (sorted keys, no spaces); the bundle id is the sha256 of
those bytes, so a change to any byte of any file, or to the configuration, changes the id."""

from __future__ import annotations

import hashlib

import msgspec

from serve.config import ModelConfig

MANIFEST_FILE = "manifest.json"
FORMAT = 1


class FileEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str  # relative, "/"-separated
    sha256: str
    size: int


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: int
    model: ModelConfig  # its ``directory`` is empty: a bundle does not know where it lies
    files: tuple[FileEntry, ...]
    frameworks: dict[str, str] = {}  # e.g. {"onnxruntime": "1.31.1", "warmserve": "0.1.0"}


def encode(manifest: Manifest) -> bytes:
    """The canonical bytes of a manifest."""
    return msgspec.json.encode(manifest, order="sorted")


def is_canonical(raw: bytes) -> bool:
    """Whether ``raw`` is canonical JSON: what it holds, sorted and without spaces, byte for byte.
    Judged on the JSON itself, not on this version's Manifest: a manifest written before a
    configuration field existed (a bundle built by an older warmserve) lacks it, and is still
    canonical (re-encoding it as this version's Manifest would add the field's default, and every
    bundle built before an upgrade would be refused)."""
    try:
        return bool(msgspec.json.encode(msgspec.json.decode(raw), order="sorted") == raw)
    except msgspec.DecodeError:
        return False


def bundle_id(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()


def decode(data: bytes) -> Manifest:
    return msgspec.json.decode(data, type=Manifest)
