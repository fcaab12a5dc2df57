"""The immutable image tag: ``<warmserve version>-<12 hex>``, so that one tag never names two
contents.

The 12 hex digits are a SHA-256 over (a) the model folders baked into ``/models``, (b) the build
inputs the Dockerfile copies from this repository (server code, protos, pins, the Dockerfile
itself) and (c) the base image when ``--base-image`` names another than the Dockerfile's default
(the default is part of the Dockerfile's bytes already). Each tree is hashed over its files in
sorted relative-path order: the path, the byte length and the bytes of every file; file times,
creation order and permissions do not count. ``__pycache__`` folders and ``*.pyc`` files are
left out (deploy/Dockerfile.dockerignore keeps them out of the image too). A symbolic link is an
error: ``COPY`` would copy the link, not what it points at.

    python deploy/image_tag.py BUNDLES_DIR              # the tag, e.g. 0.1.0-3f9c2a41b7de
    python deploy/image_tag.py --bundles-digest DIR     # sha256 of the model folders alone
    python deploy/image_tag.py --docker-build --repo REGISTRY/warmserve BUNDLES_DIR
    python deploy/image_tag.py --base-image nvidia/cuda:12.8.1-...@sha256:... BUNDLES_DIR

``--docker-build`` prints the ``docker build`` command for that tag; it does not run it. The
Dockerfile recomputes the bundles digest inside the build and fails when it differs from the one
passed in, so a tag cannot be put on other model files by hand. Standard library only: the
Docker build stage runs this file with a bare python3.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TAG_SCHEME = b"warmserve-image-tag-v1"
HEX_LENGTH = 12
IGNORED_DIRS = frozenset({"__pycache__"})
IGNORED_SUFFIXES = (".pyc",)
# What deploy/Dockerfile copies from the repository (relative to its root); generated protobuf
# stubs are rebuilt inside the image from protos/ and are left out.
SOURCE_PATHS = (
    "deploy/Dockerfile",
    "deploy/Dockerfile.dockerignore",
    "deploy/image_tag.py",
    "pyproject.toml",
    "README.md",
    "requirements/constraints.txt",
    "scripts/fix_pb_imports.py",
    "protos",
    "serve",
)
SOURCE_EXCLUDED = ("serve/frontend/pb",)
DOCKERFILE = "deploy/Dockerfile"


class TagError(Exception):
    """The input cannot be hashed faithfully (missing folder, symbolic link)."""


def _files(root: Path, excluded: Iterable[str] = ()) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under ``root``, sorted by the former."""
    if not root.is_dir():
        raise TagError(f"{root} is not a directory")
    skip = {root / e for e in excluded}
    found: list[tuple[str, Path]] = []
    for path in root.rglob("*"):
        if any(p in skip for p in (path, *path.parents)):
            continue
        relative = path.relative_to(root)
        if any(part in IGNORED_DIRS for part in relative.parts):
            continue
        if path.is_symlink():
            raise TagError(f"{path} is a symbolic link; copy the file it points at instead")
        if path.is_file() and not path.name.endswith(IGNORED_SUFFIXES):
            found.append((relative.as_posix(), path))
    return sorted(found)


def digest_entries(entries: Iterable[tuple[str, Path]]) -> str:
    """SHA-256 over (path, length, bytes) of each entry, in the order given."""
    sha = hashlib.sha256()
    for name, path in entries:
        data = path.read_bytes()
        encoded = name.encode("utf-8")
        sha.update(len(encoded).to_bytes(4, "big") + encoded)
        sha.update(len(data).to_bytes(8, "big") + data)
    return sha.hexdigest()


def tree_digest(root: Path) -> str:
    """SHA-256 hex of every file under ``root`` (the model folders baked into /models)."""
    return digest_entries(_files(root))


def source_digest(repo_root: Path = REPO_ROOT) -> str:
    """SHA-256 hex of the build inputs that deploy/Dockerfile copies from the repository."""
    entries: list[tuple[str, Path]] = []
    for item in SOURCE_PATHS:
        path = repo_root / item
        if path.is_dir():
            excluded = [e.removeprefix(item + "/") for e in SOURCE_EXCLUDED if e.startswith(item)]
            entries += [(f"{item}/{name}", p) for name, p in _files(path, excluded)]
        elif path.is_file():
            entries.append((item, path))
        else:
            raise TagError(f"build input {item} is missing from {repo_root}")
    return digest_entries(sorted(entries))


def default_base_image(repo_root: Path = REPO_ROOT) -> str:
    """The Dockerfile's ``ARG BASE_IMAGE=...`` default."""
    dockerfile = repo_root / DOCKERFILE
    for line in dockerfile.read_text().splitlines():
        name, _, value = line.removeprefix("ARG ").partition("=")
        if line.startswith("ARG ") and name.strip() == "BASE_IMAGE" and value.strip():
            return value.strip()
    raise TagError(f"{dockerfile} has no ARG BASE_IMAGE=<default>")


def image_tag(
    version: str,
    bundles_digest: str,
    build_digest: str | None = None,
    base_image: str | None = None,
) -> str:
    """``version-<12 hex>`` over the bundles digest and, when given, the build-input digest and
    a base image other than the Dockerfile's default."""
    sha = hashlib.sha256(TAG_SCHEME)
    sha.update(b"\0" + version.encode() + b"\0" + bundles_digest.encode())
    if build_digest is not None:
        sha.update(b"\0" + build_digest.encode())
    if base_image is not None:
        sha.update(b"\0base\0" + base_image.encode())
    return f"{version}-{sha.hexdigest()[:HEX_LENGTH]}"


def server_version() -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from serve import __version__

    return __version__


def docker_build_command(
    repo: str, tag: str, bundles: Path, bundles_digest: str, base_image: str | None = None
) -> str:
    """The ``docker build`` command for ``tag``; ``base_image``: the one the tag was computed
    with, when it is not the Dockerfile's default."""
    try:
        context_relative = bundles.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        raise TagError(
            f"{bundles} lies outside the build context {REPO_ROOT}; copy the model folders "
            "under it (for example build/bundles) first"
        ) from None
    base = ["--build-arg", f"BASE_IMAGE={base_image}"] if base_image is not None else []
    return shlex.join(
        [
            "docker",
            "build",
            "-f",
            DOCKERFILE,
            *base,
            "--build-arg",
            f"BUNDLES_DIR={context_relative}",
            "--build-arg",
            f"BUNDLES_DIGEST={bundles_digest}",
            "--build-arg",
            f"IMAGE_TAG={tag}",
            "-t",
            f"{repo}:{tag}",
            ".",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", type=Path, help="folder of model folders baked into /models")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--bundles-digest", action="store_true", help="print the bundles digest")
    mode.add_argument("--docker-build", action="store_true", help="print the docker command")
    parser.add_argument("--repo", default="warmserve", help="image repository for --docker-build")
    parser.add_argument("--version", help="override the warmserve version (serve.__version__)")
    parser.add_argument(
        "--base-image",
        help="the BASE_IMAGE build argument, when not the Dockerfile's default (part of the tag)",
    )
    args = parser.parse_args(argv)
    try:
        bundles = tree_digest(args.bundles)
        if args.bundles_digest:
            print(bundles)
            return 0
        base = args.base_image or None
        if base == default_base_image():
            base = None  # already hashed: it is in the Dockerfile's bytes
        tag = image_tag(args.version or server_version(), bundles, source_digest(), base)
        if args.docker_build:
            print(docker_build_command(args.repo, tag, args.bundles, bundles, base))
            print(f"# not run here (no Docker engine); then: docker push {args.repo}:{tag}")
        else:
            print(tag)
    except TagError as exc:
        print(f"image_tag: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
