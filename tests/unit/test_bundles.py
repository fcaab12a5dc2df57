"""Bundle format: reproducible builds, and every kind of tampering refused by name."""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

import serve.bundles.archive
from serve.bundles.archive import extract_archive, write_archive
from serve.bundles.build import build_bundle
from serve.bundles.cache import BundleCache
from serve.bundles.manifest import MANIFEST_FILE, decode, encode
from serve.bundles.repository import scan, version_order
from serve.bundles.verify import VerifiedBundle, list_files, verify_bundle
from serve.errors import InvalidBundleError
from serve.testing.models import build_mlp_onnx


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = build_mlp_onnx(tmp_path_factory.mktemp("src") / "mlp", process="process.py")
    (folder / "process.py").write_text("def postprocess(outputs):\n    return outputs\n")
    return folder


@pytest.fixture()
def bundle(source, tmp_path) -> Path:
    return build_bundle(source, tmp_path / "bundle").path


def test_the_same_inputs_build_the_same_id_and_the_same_archive(source, tmp_path):
    first = build_bundle(source, tmp_path / "a")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)  # other path, other mtimes
    second = build_bundle(copy, tmp_path / "b")
    assert first.id == second.id
    assert write_archive(first.path, tmp_path / "a.wsb").read_bytes() == (
        write_archive(second.path, tmp_path / "b.wsb").read_bytes()
    )
    assert {f.path for f in first.manifest.files} == {"model.onnx", "process.py"}
    assert first.manifest.frameworks["warmserve"]
    assert str(tmp_path) not in (first.path / MANIFEST_FILE).read_text()


def test_any_change_to_the_model_changes_the_id(source, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(source, changed)
    (changed / "process.py").write_text("def postprocess(outputs):\n    return dict(outputs)\n")
    assert build_bundle(changed, tmp_path / "b").id != build_bundle(source, tmp_path / "a").id


def test_a_changed_byte_is_refused_naming_the_file(bundle):
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(InvalidBundleError, match=r"file model\.onnx does not match its sha256"):
        verify_bundle(bundle)


def test_a_missing_file_is_refused_naming_it(bundle):
    (bundle / "process.py").unlink()
    with pytest.raises(InvalidBundleError, match=r"file process\.py is missing"):
        verify_bundle(bundle)


def test_an_extra_file_is_refused_naming_it(bundle):
    (bundle / "sitecustomize.py").write_text("print('hi')\n")
    with pytest.raises(InvalidBundleError, match=r"file sitecustomize\.py is not in the manifest"):
        verify_bundle(bundle)


def test_a_symlink_is_refused(bundle, tmp_path):
    (tmp_path / "outside").write_text("x")
    (bundle / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(InvalidBundleError, match="link is a symbolic link"):
        verify_bundle(bundle)


def test_an_edited_manifest_changes_the_id_or_is_refused(bundle):
    original = verify_bundle(bundle).id
    manifest = decode((bundle / MANIFEST_FILE).read_bytes())
    edited = manifest.__class__(
        manifest.format,
        manifest.model.__class__(**{**_fields(manifest.model), "max_batch_size": 8}),
        manifest.files,
        manifest.frameworks,
    )
    (bundle / MANIFEST_FILE).write_bytes(encode(edited))
    assert verify_bundle(bundle).id != original
    with pytest.raises(InvalidBundleError, match="is not the expected"):
        verify_bundle(bundle, original)
    (bundle / MANIFEST_FILE).write_bytes(encode(edited) + b"\n")
    with pytest.raises(InvalidBundleError, match="not in canonical form"):
        verify_bundle(bundle)


def _fields(struct) -> dict:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}


def test_an_archive_round_trips_and_a_traversal_entry_is_refused(bundle, tmp_path):
    archive = write_archive(bundle, tmp_path / "m.wsb")
    extracted = extract_archive(archive, BundleCache(tmp_path / "cache"))
    assert extracted.id == verify_bundle(bundle).id
    evil = tmp_path / "evil.wsb"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(InvalidBundleError, match="unsafe entry"):
        extract_archive(evil, BundleCache(tmp_path / "cache"))


def test_a_repository_scan_keeps_good_bundles_and_reports_bad_ones(source, tmp_path):
    repo = tmp_path / "repo"
    build_bundle(source, repo / "mlp_onnx" / "1")
    bad = build_bundle(source, repo / "other" / "1").path
    (bad / "model.onnx").write_bytes(b"tampered")
    sources, refused = scan(repo, BundleCache(tmp_path / "cache"))
    assert [(s.model.name, s.model.version) for s in sources] == [("mlp_onnx", "1")]
    assert len(sources[0].bundle_id) == 64
    assert len(refused) == 1 and "model.onnx does not match" in refused[0]


def test_version_labels_sort_numerically():
    assert sorted(["10", "9", "1.10", "1.2"], key=version_order) == ["1.2", "1.10", "9", "10"]


def test_importing_a_bundles_code_leaves_the_bundle_as_it_was(bundle, monkeypatch):
    """A worker imports process.py from the bundle: no __pycache__ may appear beside it (outside
    an image with PYTHONDONTWRITEBYTECODE, that extra file made every later worker, restart and
    rollback refuse the bundle), and no cached bytecode is run instead of the verified source."""
    from serve.worker.process import Processing

    verified = verify_bundle(bundle)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    Processing(verified.model, "warmserve_bundle_test_import")
    assert list_files(bundle) == ["model.onnx", "process.py"]
    assert verify_bundle(bundle, verified.id).id == verified.id


@pytest.mark.parametrize("where", ["../shared_process.py", "ABSOLUTE"])
def test_a_manifest_naming_code_outside_the_bundle_is_refused(bundle, tmp_path, where):
    """The hash covers only the bundle's own files: code or weights the configuration names
    elsewhere could change while the bundle id stays the same."""
    outside = tmp_path / "shared_process.py"
    outside.write_text("def postprocess(outputs):\n    return outputs\n")
    name = str(outside) if where == "ABSOLUTE" else where
    manifest = decode((bundle / MANIFEST_FILE).read_bytes())
    model = manifest.model.__class__(**{**_fields(manifest.model), "process": name})
    files = tuple(f for f in manifest.files if f.path != "process.py")
    (bundle / "process.py").unlink()
    (bundle / MANIFEST_FILE).write_bytes(
        encode(manifest.__class__(manifest.format, model, files, manifest.frameworks))
    )
    with pytest.raises(InvalidBundleError, match=rf"process {name!r} is not a file of the bundle"):
        verify_bundle(bundle)


def test_two_processes_unpacking_the_same_archive_into_one_cache_both_succeed(
    bundle, tmp_path, monkeypatch
):
    """Two servers (or a server and `warmserve bundle verify`) sharing a cache: the one that
    finishes second finds the bundle already in place, which is not a broken archive."""
    archive, root = write_archive(bundle, tmp_path / "m.wsb"), tmp_path / "cache"
    extractall, raced = tarfile.TarFile.extractall, []

    def other_process_first(self: tarfile.TarFile, *args: Any, **kwargs: Any) -> None:
        extractall(self, *args, **kwargs)
        if not raced:
            raced.append(True)  # the other one finishes while this one unpacks:
            extract_archive(archive, BundleCache(root))

    monkeypatch.setattr(tarfile.TarFile, "extractall", other_process_first)
    assert extract_archive(archive, BundleCache(root)).id == verify_bundle(bundle).id
    assert raced and _names(root) == _entry(verify_bundle(bundle).id)


def test_two_processes_replacing_the_same_refused_copy_keep_the_first_ones_copy(
    bundle, tmp_path, monkeypatch
):
    """Two servers find the same cached copy changed on disk and both unpack it again: the
    one that comes second must not move the first one's fresh copy aside (a worker of the
    first may be loading from it: its files would vanish mid-load) but use it."""
    archive, root = write_archive(bundle, tmp_path / "m.wsb"), tmp_path / "cache"
    first = extract_archive(archive, BundleCache(root))
    (first.path / "model.onnx").write_bytes(b"changed in the cache")
    real, raced, fresh = serve.bundles.archive.verify_bundle_again, [], []

    def other_process_between(*args: Any) -> VerifiedBundle:
        try:
            return real(*args)
        except InvalidBundleError:
            if not raced:  # this one refused the copy; the other one replaces it meanwhile
                raced.append(True)
                fresh.append(extract_archive(archive, BundleCache(root)))
                fresh.append(os.stat(fresh[0].path / "model.onnx").st_ino)
            raise

    monkeypatch.setattr(serve.bundles.archive, "verify_bundle_again", other_process_between)
    again = extract_archive(archive, BundleCache(root))
    assert fresh and again.id == first.id == fresh[0].id and again.path == first.path
    assert os.stat(again.path / "model.onnx").st_ino == fresh[1]  # the first one's copy
    assert (again.path / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    assert _names(root) == _entry(first.id)


def test_a_cached_copy_changed_on_disk_is_unpacked_again_from_its_archive(bundle, tmp_path):
    """The archive is good; only the unpacked copy changed (an edit, a tool writing beside the
    code, a bad disk): refusing the archive for ever would need someone to clear the cache."""
    archive, cache = write_archive(bundle, tmp_path / "m.wsb"), BundleCache(tmp_path / "cache")
    first = extract_archive(archive, cache)
    (first.path / "process.py").write_text("raise SystemExit('changed in the cache')\n")
    (first.path / "extra.txt").write_text("x")
    again = extract_archive(archive, cache)
    assert again.id == first.id and again.path == first.path
    assert (again.path / "process.py").read_bytes() == (bundle / "process.py").read_bytes()
    assert _names(cache.root) == _entry(first.id)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _entry(bundle_id: str) -> list[str]:
    """An unpacked bundle in the cache: its folder, and the lock file its users hold."""
    return [bundle_id, f"{bundle_id}.lock"]


def _other_version(source: Path, tmp_path: Path) -> Path:
    changed = tmp_path / "src-2"
    shutil.copytree(source, changed)
    (changed / "process.py").write_text("def postprocess(outputs):\n    return dict(outputs)\n")
    return build_bundle(changed, tmp_path / "bundle-2").path


HOLDER = """
import sys
from pathlib import Path
from serve.bundles.archive import extract_archive
from serve.bundles.cache import BundleCache
extract_archive(Path(sys.argv[1]), BundleCache(Path(sys.argv[2])))
print("held", flush=True)
sys.stdin.read()
"""


def test_a_cache_entry_is_removed_once_no_process_uses_it(source, bundle, tmp_path, caplog):
    """The cache is shared (two servers, a dev machine's ~/.cache): an entry another process
    holds stays; once that process is gone (killed: the kernel drops its locks), it goes."""
    root = tmp_path / "cache"
    old, new = (
        write_archive(path, tmp_path / f"{n}.wsb")
        for n, path in (("1", bundle), ("2", _other_version(source, tmp_path)))
    )
    cache = BundleCache(root)
    old_id, new_id = extract_archive(old, cache).id, extract_archive(new, cache).id
    other = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(old), str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == "held\n"
        cache.collect({new_id})  # version 1 left this process's repository
        assert _names(root) == sorted(_entry(old_id) + _entry(new_id))
    finally:
        other.kill()
        other.wait(timeout=60)
    with caplog.at_level(logging.INFO, logger="serve.bundles.cache"):
        cache.collect({new_id})
    assert _names(root) == _entry(new_id)
    assert verify_bundle(root / new_id, new_id).id == new_id  # the one in use is untouched
    assert f"removed {root / old_id} (" in caplog.text and " MiB), used by no server" in caplog.text


def test_a_cache_entry_this_process_uses_or_a_sibling_holds_stays(source, bundle, tmp_path):
    """flock locks belong to an open file description: two BundleCache objects are two users."""
    root = tmp_path / "cache"
    archive = write_archive(bundle, tmp_path / "m.wsb")
    mine, sibling = BundleCache(root), BundleCache(root)
    bundle_id = extract_archive(archive, mine).id
    extract_archive(archive, sibling)
    mine.collect(set())  # no longer used here; the sibling still uses it
    assert _names(root) == _entry(bundle_id)
    sibling.collect({bundle_id})  # still used there: kept, and nothing else to remove
    assert _names(root) == _entry(bundle_id) and sibling.held() == {bundle_id}
    sibling.collect(set())
    assert _names(root) == []


def test_unpacking_leftovers_go_after_an_hour_and_other_files_stay(tmp_path):
    root = tmp_path / "cache"
    left, unpacking, other = root / ".extract-abc", root / ".extract-def", root / "notes"
    for folder in (left, unpacking, other):
        (folder / "bundle").mkdir(parents=True)
        (folder / "bundle" / "model.onnx").write_bytes(b"x" * 1000)
    two_hours_ago = time.time() - 7200
    os.utime(left, (two_hours_ago, two_hours_ago))
    os.utime(other, (two_hours_ago, two_hours_ago))
    BundleCache(root).collect(set())
    assert _names(root) == [".extract-def", "notes"]


def test_a_lock_file_unlinked_by_a_collector_before_it_was_locked_is_not_trusted(
    bundle, tmp_path, monkeypatch
):
    """This process opens the entry's lock file; another process's collector removes the entry
    and unlinks that file; this one's shared lock is then on a file no longer there, which no
    later collector sees: it must lock the file now at that path, or its entry can be removed
    while it uses it."""
    import serve.bundles.cache

    root = tmp_path / "cache"
    archive = write_archive(bundle, tmp_path / "m.wsb")
    earlier = BundleCache(root)  # an earlier server's entry
    bundle_id = extract_archive(archive, earlier).id
    earlier.close()
    flock, raced = fcntl.flock, []

    def collected_meanwhile(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_SH and not raced:
            raced.append(True)
            BundleCache(root).collect(set())  # between this process's open and its flock
            assert _names(root) == []
            passing = BundleCache(root)  # and a process that came and went made a new file
            passing.hold(bundle_id)
            passing.close()
        flock(fd, operation)

    monkeypatch.setattr(serve.bundles.cache.fcntl, "flock", collected_meanwhile)
    cache = BundleCache(root)
    assert extract_archive(archive, cache).id == bundle_id and raced
    monkeypatch.setattr(serve.bundles.cache.fcntl, "flock", flock)
    BundleCache(root).collect(set())  # a third process collects: this one still uses it
    assert _names(root) == _entry(bundle_id)
    assert verify_bundle(root / bundle_id, bundle_id).id == bundle_id


def _count_hashing(monkeypatch) -> list[str]:
    import serve.bundles.verify as verify_module

    hashed: list[str] = []
    real = verify_module.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(verify_module, "sha256_file", counting)
    return hashed


def test_a_repository_scan_does_not_hash_an_untouched_bundle_again(source, tmp_path, monkeypatch):
    """A model-control load scans the whole repository: hashing every bundle's weights each time
    made loads slow. An untouched bundle this process verified is not hashed again; the worker
    that loads it still verifies it in full."""
    repo, cache = tmp_path / "repo", BundleCache(tmp_path / "cache")
    build_bundle(source, repo / "mlp_onnx" / "1")
    hashed = _count_hashing(monkeypatch)
    first, _ = scan(repo, cache)
    assert hashed and len(first) == 1
    hashed.clear()
    again, refused = scan(repo, cache)
    assert hashed == [] and refused == [] and again == first
    verify_bundle(repo / "mlp_onnx" / "1")  # the worker's check
    assert hashed  # (hashed in full every time)


def test_a_bundle_changed_with_its_times_set_back_is_hashed_again_and_refused(bundle, tmp_path):
    from serve.bundles.verify import verify_bundle_again

    assert verify_bundle_again(bundle).id
    weights = bundle / "model.onnx"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as it was (ctime is not)
    with pytest.raises(InvalidBundleError, match=r"model\.onnx does not match its sha256"):
        verify_bundle_again(bundle)


def test_an_untouched_archive_is_not_read_again_and_a_rewritten_one_is(
    bundle, tmp_path, monkeypatch
):
    archive, cache = write_archive(bundle, tmp_path / "m.wsb"), BundleCache(tmp_path / "cache")
    first = extract_archive(archive, cache)
    real_open = tarfile.open
    opened: list[Path] = []

    def counting_open(name, *args, **kwargs):
        opened.append(Path(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    hashed = _count_hashing(monkeypatch)
    assert extract_archive(archive, cache) == first
    assert opened == [] and hashed == []
    shutil.copyfile(archive, tmp_path / "copy.wsb")
    os.replace(tmp_path / "copy.wsb", archive)  # the same bytes, a new file: read again
    assert extract_archive(archive, cache).id == first.id
    assert opened == [archive]  # its id read again (its unpacked copy is untouched: not hashed)


def test_a_bundle_built_with_other_framework_versions_is_served_with_a_warning(
    source, tmp_path, monkeypatch, caplog
):
    import serve.bundles.build as build_module

    with monkeypatch.context() as patched:
        patched.setattr(
            build_module,
            "framework_versions",
            lambda backend: {"warmserve": "0.0.9", "onnxruntime": "0.0.1", "onnx": "0.0.2"},
        )
        build_bundle(source, tmp_path / "repo" / "mlp_onnx" / "1")
    caplog.set_level(logging.WARNING, logger="serve.bundles.repository")
    cache = BundleCache(tmp_path / "cache")
    sources, refused = scan(tmp_path / "repo", cache)
    assert len(sources) == 1 and refused == []  # served: patch releases differ all the time
    warnings = [r.getMessage() for r in caplog.records if "was built with" in r.getMessage()]
    assert len(warnings) == 1
    assert "onnx 0.0.2, onnxruntime 0.0.1" in warnings[0] and "warmserve" not in warnings[0]
    scan(tmp_path / "repo", cache)  # once per bundle, not at every load
    assert sum("was built with" in r.getMessage() for r in caplog.records) == 1


def test_the_gpu_build_of_onnxruntime_counts_as_onnxruntime(monkeypatch):
    import importlib.metadata

    from serve.bundles.build import framework_versions

    installed = {"onnxruntime-gpu": "1.31.1", "onnx": "1.23.2"}

    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    found = framework_versions("onnx")
    assert (found["onnxruntime"], found["onnx"]) == ("1.31.1", "1.23.2")


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_a_half_copied_archive_is_refused_and_the_rest_of_the_repository_loads(
    source, bundle, tmp_path, cut
):
    """A .wsb still being copied into the repository (cut short) is a refused bundle, named,
    not an error out of the whole scan (which failed every load with INTERNAL)."""
    repo = tmp_path / "repo"
    build_bundle(source, repo / "mlp_onnx" / "1")
    data = write_archive(bundle, tmp_path / "m.wsb").read_bytes()
    (repo / "other-1.wsb").write_bytes(data[: int(len(data) * cut)])
    sources, refused = scan(repo, BundleCache(tmp_path / "cache"))
    assert [(s.model.name, s.model.version) for s in sources] == [("mlp_onnx", "1")]
    assert len(refused) == 1 and "other-1.wsb: not a readable bundle archive" in refused[0]
    cache = tmp_path / "cache"  # no half-unpacked copy
    assert not cache.exists() or [p.name for p in cache.iterdir()] == []


def test_an_archive_that_does_not_fit_in_the_cache_is_refused_naming_the_cache(
    bundle, tmp_path, monkeypatch
):
    """The cache's disk is full: the message says so and where, not that the archive is
    unreadable (it is fine: the operator should free the cache, not rebuild the bundle), and
    no half-unpacked copy stays behind."""
    archive, root = write_archive(bundle, tmp_path / "m.wsb"), tmp_path / "cache"
    extract = tarfile.TarFile.extractall

    def disk_full(self: tarfile.TarFile, path: str, *args: object, **kwargs: object) -> None:
        extract(self, path, members=self.getmembers()[:1], filter="data")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", disk_full)
    with pytest.raises(InvalidBundleError) as refused:
        extract_archive(archive, BundleCache(root))
    message = str(refused.value)
    assert "could not unpack it into the bundle cache" in message and str(root) in message
    assert "No space left on device" in message and "not a readable" not in message
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


def test_a_bundle_built_before_a_config_field_existed_is_still_valid(bundle):
    # Its manifest lacks the field; re-encoded as this version's Manifest it would carry the
    # field's default, and every bundle built before an upgrade was refused as not canonical.
    import json

    import msgspec

    manifest = json.loads((bundle / MANIFEST_FILE).read_bytes())
    del manifest["model"]["pool"]["idle_spin_us"]  # (added in the thirteenth session)
    older = msgspec.json.encode(manifest, order="sorted")  # as the older version wrote it
    (bundle / MANIFEST_FILE).write_bytes(older)
    verified = verify_bundle(bundle)
    assert verified.id == hashlib.sha256(older).hexdigest()  # its own bytes, as written
    assert verified.manifest.model.pool.idle_spin_us == -1.0  # the default, where it is absent
    (bundle / MANIFEST_FILE).write_bytes(json.dumps(manifest, sort_keys=True).encode())
    with pytest.raises(InvalidBundleError, match="not in canonical form"):  # (spaces)
        verify_bundle(bundle)
