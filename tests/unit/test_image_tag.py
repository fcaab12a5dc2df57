"""deploy/image_tag.py: the image tag changes with any byte of the baked content, never with
file times or the order files were written in."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType

import pytest

from serve import __version__

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_image_tag", ROOT / "deploy/image_tag.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


image_tag = _load()
FILES = {
    "resnet/model.toml": b'name = "resnet"\nbackend = "torch"\n',
    "resnet/model.pt": bytes(range(256)) * 64,
    "bert/model.toml": b'name = "bert"\nbackend = "onnx"\n',
    "bert/model.onnx": b"\x08\x07" * 1000,
}


def write_tree(root: Path, files: dict[str, bytes], order: list[str] | None = None) -> Path:
    for name in order or list(files):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])
    return root


def tag_of(root: Path) -> str:
    return image_tag.image_tag("0.1.0", image_tag.tree_digest(root))


def test_the_tag_is_the_version_and_twelve_hex_digits(tmp_path):
    tag = tag_of(write_tree(tmp_path, FILES))
    assert re.fullmatch(r"0\.1\.0-[0-9a-f]{12}", tag)


def test_the_same_content_gives_the_same_tag_whatever_the_times_and_write_order(tmp_path):
    first = write_tree(tmp_path / "a", FILES)
    second = write_tree(tmp_path / "b", FILES, order=sorted(FILES, reverse=True))
    for i, path in enumerate(sorted(second.rglob("*"))):
        os.utime(path, (1_000_000 + i, 2_000_000 - i))
    (second / "empty-folder").mkdir()  # COPY makes nothing of an empty folder's content either
    assert tag_of(first) == tag_of(second)


@pytest.mark.parametrize(
    "change",
    ["one byte", "one byte appended", "a file added", "a file renamed", "a file moved"],
)
def test_any_change_of_content_changes_the_tag(tmp_path, change):
    before = tag_of(write_tree(tmp_path / "before", FILES))
    after = write_tree(tmp_path / "after", FILES)
    weights = after / "resnet/model.pt"
    if change == "one byte":
        data = bytearray(weights.read_bytes())
        data[1000] ^= 0x01
        weights.write_bytes(bytes(data))
    elif change == "one byte appended":
        weights.write_bytes(weights.read_bytes() + b"\0")
    elif change == "a file added":
        (after / "bert/probe_inputs.npz").write_bytes(b"")
    elif change == "a file renamed":
        weights.rename(after / "resnet/model2.pt")
    else:
        (after / "resnet2").mkdir()
        weights.rename(after / "resnet2/model.pt")
    assert tag_of(after) != before


def test_bytes_cannot_shift_between_a_name_and_a_file(tmp_path):
    one = write_tree(tmp_path / "one", {"ab": b"c"})
    other = write_tree(tmp_path / "other", {"a": b"bc"})
    assert tag_of(one) != tag_of(other)


def test_the_version_and_the_build_inputs_are_part_of_the_tag(tmp_path):
    digest = image_tag.tree_digest(write_tree(tmp_path, FILES))
    assert image_tag.image_tag("0.1.0", digest) != image_tag.image_tag("0.1.1", digest)
    assert image_tag.image_tag("0.1.0", digest, "a" * 64) != image_tag.image_tag(
        "0.1.0", digest, "b" * 64
    )


def test_bytecode_caches_are_left_out_like_the_dockerignore_leaves_them_out(tmp_path):
    before = tag_of(write_tree(tmp_path / "a", FILES))
    after = write_tree(tmp_path / "b", FILES)
    (after / "resnet/__pycache__").mkdir()
    (after / "resnet/__pycache__/pre.cpython-312.pyc").write_bytes(b"cache")
    (after / "resnet/post.pyc").write_bytes(b"cache")
    assert tag_of(after) == before


def test_a_symbolic_link_is_refused(tmp_path):
    root = write_tree(tmp_path / "repo", FILES)
    (root / "resnet/alias.pt").symlink_to(root / "resnet/model.pt")
    with pytest.raises(image_tag.TagError, match="symbolic link"):
        image_tag.tree_digest(root)


def test_the_command_line_prints_the_tag_and_an_honest_docker_command(tmp_path, capsys):
    bundles = write_tree(tmp_path, FILES)
    assert image_tag.main([str(bundles)]) == 0
    tag = capsys.readouterr().out.strip()
    assert re.fullmatch(rf"{re.escape(__version__)}-[0-9a-f]{{12}}", tag)
    assert image_tag.main([str(bundles)]) == 0
    assert capsys.readouterr().out.strip() == tag  # the repository did not change in between
    assert image_tag.main(["--bundles-digest", str(bundles)]) == 0
    assert capsys.readouterr().out.strip() == image_tag.tree_digest(bundles)
    # bundles outside the build context cannot be COPY'd: refused, not printed
    assert image_tag.main(["--docker-build", str(bundles)]) == 2
    assert "outside the build context" in capsys.readouterr().err


def test_the_docker_command_names_the_tag_the_digest_and_the_bundles():
    command = image_tag.docker_build_command(
        "registry.example.com/warmserve", "0.1.0-abcdef012345", ROOT / "build/bundles", "d" * 64
    )
    assert command == (
        "docker build -f deploy/Dockerfile --build-arg BUNDLES_DIR=build/bundles "
        f"--build-arg BUNDLES_DIGEST={'d' * 64} --build-arg IMAGE_TAG=0.1.0-abcdef012345 "
        "-t registry.example.com/warmserve:0.1.0-abcdef012345 ."
    )


def test_the_build_inputs_exist_and_hash(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{64}", image_tag.source_digest())


def test_another_base_image_gives_another_tag_and_the_command_builds_on_it(tmp_path, capsys):
    bundles = write_tree(tmp_path, FILES)
    default = image_tag.default_base_image()
    assert default.startswith("nvidia/cuda:")
    assert image_tag.main([str(bundles)]) == 0
    plain = capsys.readouterr().out.strip()
    # the Dockerfile's own default is already in the hashed Dockerfile: the same tag
    assert image_tag.main(["--base-image", default, str(bundles)]) == 0
    assert capsys.readouterr().out.strip() == plain
    cuda12 = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
    assert image_tag.main(["--base-image", cuda12, str(bundles)]) == 0
    other = capsys.readouterr().out.strip()
    assert other != plain and other.split("-")[0] == plain.split("-")[0]
    command = image_tag.docker_build_command(
        "r/warmserve", other, ROOT / "build/bundles", "d" * 64, cuda12
    )
    assert f"--build-arg BASE_IMAGE={cuda12} " in command and command.endswith(
        f"r/warmserve:{other} ."
    )


def test_a_dockerfile_without_a_default_base_image_is_refused(tmp_path):
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy/Dockerfile").write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n")
    with pytest.raises(image_tag.TagError, match="no ARG BASE_IMAGE"):
        image_tag.default_base_image(tmp_path)
