"""Immutable model bundles: weights, pre/post-processing code and a manifest under one hash."""

from serve.bundles.manifest import MANIFEST_FILE, FileEntry, Manifest
from serve.bundles.verify import VerifiedBundle, verify_bundle

__all__ = ["MANIFEST_FILE", "FileEntry", "Manifest", "VerifiedBundle", "verify_bundle"]
