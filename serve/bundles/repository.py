"""A model repository: a folder of bundles (directories with manifest.json, or .wsb archives),
optionally grouped as ``NAME/VERSION/``, and of plain model folders (model.toml, unverified:
for development). A bundle that fails verification is refused and reported; the rest load."""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from serve.bundles.archive import SUFFIX, extract_archive, forget_identities
from serve.bundles.build import framework_versions
from serve.bundles.cache import BundleCache
from serve.bundles.manifest import MANIFEST_FILE
from serve.bundles.verify import VerifiedBundle, forget_verified, verify_bundle_again
from serve.config import MODEL_CONFIG_FILE, ModelConfig, load_model_dir
from serve.errors import InvalidBundleError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelSource:
    model: ModelConfig  # with ``directory`` set
    bundle_id: str = ""  # "" for an unverified model folder

    @property
    def key(self) -> tuple[str, str]:
        return self.model.name, self.model.version


def load_source(path: Path, cache: BundleCache) -> ModelSource:
    """One bundle directory, archive or model folder, verified where it is a bundle."""
    if path.is_file() and path.suffix == SUFFIX:
        bundle = extract_archive(path, cache)
        _check_frameworks(path, bundle)
        return ModelSource(bundle.model, bundle.id)
    if (path / MANIFEST_FILE).is_file():
        bundle = verify_bundle_again(path)
        _check_frameworks(path, bundle)
        return ModelSource(bundle.model, bundle.id)
    if (path / MODEL_CONFIG_FILE).is_file():
        return ModelSource(load_model_dir(path))
    raise InvalidBundleError(f"{path} is neither a bundle nor a model folder")


_warned: set[str] = set()  # bundle ids whose framework difference was logged
# what this process runs does not change while it runs: read the package metadata once
_running_versions = functools.cache(framework_versions)


def _check_frameworks(path: Path, bundle: VerifiedBundle) -> None:
    """Warn (once per bundle) when the bundle was built with other framework versions than this
    server runs: its outputs may differ from what was tested (a probe with expected outputs
    checks them). Not refused: patch releases differ all the time."""
    built = bundle.manifest.frameworks
    here = _running_versions(bundle.model.backend)
    differ = {
        name: (version, here.get(name, "not installed"))
        for name, version in built.items()
        if name != "warmserve" and here.get(name) != version
    }
    if not differ or bundle.id in _warned:
        return
    _warned.add(bundle.id)
    log.warning(
        "%s (%s version %s) was built with %s; this server runs %s",
        path,
        bundle.model.name,
        bundle.model.version,
        ", ".join(f"{name} {built_v}" for name, (built_v, _) in sorted(differ.items())),
        ", ".join(f"{name} {here_v}" for name, (_, here_v) in sorted(differ.items())),
    )


def _candidates(root: Path) -> list[Path]:
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if (child.suffix == SUFFIX and child.is_file()) or (
            child.is_dir()
            and ((child / MANIFEST_FILE).is_file() or (child / MODEL_CONFIG_FILE).is_file())
        ):
            found.append(child)
        elif child.is_dir() and not child.name.startswith("."):
            found.extend(_candidates(child))  # NAME/VERSION/ layout
    return found


def scan(root: Path, cache: BundleCache) -> tuple[list[ModelSource], list[str]]:
    """Every loadable source under ``root``, and a message for each one refused. The archives'
    cache entries are held by this process until a ``cache.collect`` that does not keep them."""
    if not root.is_dir():
        raise InvalidBundleError(f"model repository {root} is not a directory")
    sources: dict[tuple[str, str], ModelSource] = {}
    problems: list[str] = []
    try:
        candidates = _candidates(root)
    except OSError as exc:  # (a folder of it that cannot be listed: a permission)
        raise InvalidBundleError(f"model repository {root} cannot be read: {exc}") from None
    for path in candidates:
        try:
            source = load_source(path, cache)
        except InvalidBundleError as exc:
            problems.append(str(exc))
            log.error("refused: %s", exc)
            continue
        if source.key in sources:
            problems.append(f"{path}: {source.key[0]} version {source.key[1]} appears twice")
            log.error("refused: %s", problems[-1])
            continue
        sources[source.key] = source
    # what this process remembers of verified bundles: only what the repository still holds
    kept = sources.values()
    forget_verified({Path(s.model.directory).resolve() for s in kept if s.bundle_id})
    forget_identities({p.resolve() for p in candidates if p.suffix == SUFFIX})
    return list(sources.values()), problems


def version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for version labels: numeric parts numerically ("10" after "9")."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-_]", version))


def newest(sources: list[ModelSource]) -> ModelSource:
    return max(sources, key=lambda s: version_order(s.model.version))
