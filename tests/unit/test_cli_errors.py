"""The command line meets a path that is not what it should be: one line naming it and a
non-zero exit, never a traceback (and never a user's folder deleted)."""

from pathlib import Path

import pytest

from serve import cli
from serve.bundles.build import build_bundle
from serve.bundles.cache import BundleCache
from serve.bundles.repository import scan
from serve.bundles.verify import verify_bundle
from serve.errors import InvalidBundleError
from serve.testing.models import write_config

CONFIG = {
    "name": "m",
    "backend": "onnx",
    "model_file": "model.onnx",
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [4]}],
    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [1]}],
}


def _source(tmp_path: Path) -> Path:
    folder = write_config(tmp_path / "source", CONFIG)
    (folder / "model.onnx").write_bytes(b"weights")
    return folder


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip()


def test_a_bundle_built_onto_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidBundleError, match="file exists and is not an empty directory"):
        build_bundle(_source(tmp_path), tmp_path / "file")
    code, err = _main(
        capsys, "bundle", "build", str(_source(tmp_path)), "--out", f"{tmp_path}/file"
    )
    assert code == 2 and err.endswith("file exists and is not an empty directory")


def test_a_bundle_built_from_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, err = _main(capsys, "bundle", "build", str(tmp_path / "file"), "--out", f"{tmp_path}/b")
    assert code == 2 and err.endswith("file is not a model folder (a directory with model.toml)")


def test_a_bundle_verified_that_is_a_file_or_unreadable_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidBundleError, match=r"file: not a bundle \(a directory with"):
        verify_bundle(tmp_path / "file")
    (tmp_path / "odd" / "manifest.json").mkdir(parents=True)
    code, err = _main(capsys, "bundle", "verify", str(tmp_path / "odd"))
    assert code == 2 and err.endswith("odd: cannot read manifest.json: Is a directory")


def test_an_archive_that_cannot_be_written_is_a_clear_error(tmp_path, capsys):
    archive = tmp_path / "no" / "such" / "m.wsb"
    code, err = _main(
        capsys,
        "bundle",
        "build",
        str(_source(tmp_path)),
        "--out",
        f"{tmp_path}/b",
        "--archive",
        str(archive),
    )
    assert code == 2 and err.startswith("warmserve bundle: ") and str(archive) in err


def test_the_demo_never_replaces_a_folder_that_holds_something(tmp_path, capsys):
    # the demo builder replaces its target whole: `warmserve demo ~/work` deleted ~/work
    (tmp_path / "mine.txt").write_text("keep me")
    code, err = _main(capsys, "demo", str(tmp_path))
    assert code == 2 and "exists and is not an empty folder" in err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    code, err = _main(capsys, "demo", str(tmp_path / "file"))
    assert code == 2 and "file exists and is not an empty folder" in err


def test_a_repository_that_cannot_be_listed_is_refused_naming_it(tmp_path, monkeypatch):
    def denied(path: Path):
        raise PermissionError(13, "Permission denied", str(path))  # (root ignores chmod 000)

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(InvalidBundleError, match=rf"model repository {tmp_path} cannot be read"):
        scan(tmp_path, BundleCache(tmp_path / "cache"))


@pytest.mark.parametrize("marker", ["model.toml", "manifest.json"])
def test_a_model_folder_given_as_the_repository_is_refused_naming_its_parent(
    tmp_path, capsys, monkeypatch, marker
):
    # it was scanned as a repository of no models: the server ran, never ready
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / marker).write_text("")

    async def serving(config):  # (without the check, the server would start here)
        return 0

    monkeypatch.setattr(cli, "_serve", serving)
    code, err = _main(capsys, "serve", "--grpc-port", "0", "--repository", str(model))
    assert code == 2
    assert f"holds {marker}): pass the folder that holds the models, {model.parent}" in err


def test_an_empty_repository_is_refused_not_replaced_by_the_demo_models(capsys, monkeypatch):
    # --repository "$MODELS" with MODELS unset served the demo models (built on first use)
    def no_demo():
        raise AssertionError("the demo models were chosen")

    monkeypatch.setattr(cli, "demo_repository", no_demo)
    monkeypatch.delenv("WARMSERVE_REPOSITORY", raising=False)
    code, err = _main(capsys, "serve", "--grpc-port", "0", "--repository", "")
    assert (
        code == 2
        and err
        == "warmserve: --repository is empty: name the model repository "
        "folder (leave the flag out to serve the demo models)"
    )
    monkeypatch.setenv("WARMSERVE_REPOSITORY", "")
    code, err = _main(capsys, "serve", "--grpc-port", "0")
    assert code == 2 and "WARMSERVE_REPOSITORY is set but empty ('')" in err


def test_a_bundle_cache_that_cannot_be_made_is_named_not_the_archive(tmp_path):
    # the archive was reported "not a readable bundle archive" when the cache was at fault
    from serve.bundles.archive import extract_archive, write_archive

    bundle = build_bundle(_source(tmp_path), tmp_path / "bundle")
    write_archive(bundle.path, tmp_path / "m.wsb")
    (tmp_path / "file").write_text("")
    cache = BundleCache(tmp_path / "file" / "cache")
    with pytest.raises(InvalidBundleError) as refused:
        extract_archive(tmp_path / "m.wsb", cache)
    assert f"the bundle cache {cache.root} cannot be used (WARMSERVE_CACHE_DIR)" in str(
        refused.value
    )
    assert "not a readable bundle archive" not in str(refused.value)


@pytest.mark.parametrize(
    "argv", [["index"], ["load", "m"], ["unload", "m", "--version", "2"], ["rollback", "m"]]
)
def test_a_control_command_without_a_server_is_one_line_and_exit_2(capsys, argv):
    import socket

    with socket.socket() as taken:  # bound, never listening: connections are refused
        taken.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{taken.getsockname()[1]}"
        code, err = _main(capsys, *argv, "--url", url)
    assert code == 2 and err.startswith("warmserve: UNAVAILABLE: ") and url in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "instead"),
    [("load", "load the newest version"), ("unload", "unload every version")],
)
def test_an_empty_version_is_refused_not_read_as_no_version(capsys, monkeypatch, command, instead):
    # `warmserve unload m --version "$V"` with V unset unloaded every version of m
    from serve.frontend import client

    sent: list[dict[str, object]] = []
    monkeypatch.setattr(client, "control", lambda url, action, model, values: sent.append(values))
    code, err = _main(capsys, command, "m", "--version", "", "--url", "127.0.0.1:1")
    assert code == 2 and sent == []
    assert err == (
        "warmserve: --version is empty: name a version label, or leave the flag out to " + instead
    )
    assert _main(capsys, command, "m", "--version", "2", "--url", "127.0.0.1:1")[0] == 0
    assert _main(capsys, command, "m", "--url", "127.0.0.1:1")[0] == 0
    assert sent == [{"version": "2"}, {}]
