"""Model control: load a version from the repository (a rollout), roll back, unload.

Off unless ``model_control`` is enabled: a serving process should not change what it serves
unless its operator asked for that mode.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from serve.bundles.cache import BundleCache
from serve.bundles.repository import newest, scan, version_order
from serve.config import ServerConfig
from serve.errors import ConfigError, InvalidBundleError, InvalidInputError, ModelNotFoundError
from serve.runtime import Runtime

log = logging.getLogger(__name__)


def version_parameter(value: object) -> str:
    """The ``version`` parameter of a load or unload as a version label ("": not given). A
    string is the label; an int64 is the version of that number (``NAME/7/``). Anything else
    (a bool, bytes) is refused: turned into text, True would ask for a version "True"."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    raise InvalidInputError(
        "parameter 'version' must be a version label: a string, or an int64 version number "
        f"(not negative), not {type(value).__name__} {value!r}"
    )


def _brief(reasons: list[str], most: int = 3, width: int = 300) -> str:
    """Why bundles were refused, for an answer: the first ``most`` reasons, each cut to
    ``width`` characters (a bundle whose config cannot be read names no model, so it may be
    the one the caller meant)."""
    shown = [r if len(r) <= width else r[: width - 3] + "..." for r in reasons[:most]]
    more = f" | and {len(reasons) - most} more (see the log)" if len(reasons) > most else ""
    return " | ".join(shown) + more


class ModelControl:
    def __init__(
        self, runtime: Runtime, config: ServerConfig, repository: Path, cache: BundleCache
    ) -> None:
        self._runtime = runtime
        self._config = config
        self._repository = repository
        self._cache = cache
        self._scanning = asyncio.Lock()  # one scan at a time: they share the unpacking cache
        # bundle ids a load picked and is rolling out (not yet loaded, so not in the runtime's
        # bundles in use): a collection by another load's scan must keep their cached copies
        self._rolling_out: dict[str, int] = {}

    def _check_request(self, name: str) -> None:
        if not self._config.model_control:
            raise ConfigError(
                "model control is disabled on this server; start it with --model-control "
                "(WARMSERVE_MODEL_CONTROL=true) to load, unload or roll back models"
            )
        if not name or "/" in name:  # (as model names are: a path is not one)
            raise InvalidInputError(
                f"model name must be non-empty and contain no '/', got {name!r}; "
                "name a model of the repository"
            )

    async def load(self, name: str, version: object = "") -> str:
        """Roll out ``version`` of ``name`` (default: its newest) from the repository. The load
        goes on to its end (the scan included) even if the caller stops waiting. ``version``:
        the request's parameter as sent (``version_parameter``)."""
        self._check_request(name)
        version = version_parameter(version)
        loaded: str = await self._runtime.run_to_end(name, "load", self._load(name, version))
        return loaded

    async def _load(self, name: str, version: str) -> str:
        async with self._scanning:  # hashing every bundle takes a while: off the event loop
            sources, refused = await asyncio.to_thread(scan, self._repository, self._cache)
            # unpacked bundles neither in the repository nor loaded any more: removed
            in_use = {s.bundle_id for s in sources} | self._runtime.bundles_in_use()
            in_use |= set(self._rolling_out)
            await asyncio.to_thread(self._cache.collect, in_use)
        candidates = [s for s in sources if s.model.name == name]
        folders = {str(self._repository / name), str((self._repository / name).resolve())}
        mine = [r for r in refused if any(f"{f}/" in r or f"{f}:" in r for f in folders)]
        if mine and not version:  # the broken one may be the newest: do not pick an older one
            valid = ", ".join(sorted((s.model.version for s in candidates), key=version_order))
            raise InvalidBundleError(
                f"cannot tell which bundle of {name!r} is the newest in {self._repository}: "
                + " | ".join(mine)
                + f"; name a version to load one of the valid ones ({valid or 'none'})"
            )
        if version:
            candidates = [s for s in candidates if s.model.version == version]
        if not candidates:
            wanted = f"{name!r} version {version!r}" if version else repr(name)
            if mine:  # the one asked for is there but broken: say why
                raise InvalidBundleError(
                    f"no valid bundle of {wanted} in {self._repository}; refused: "
                    + " | ".join(mine)
                )
            others = (
                f" ({len(refused)} other bundle(s) refused: {_brief(refused)})" if refused else ""
            )
            raise ModelNotFoundError(f"no bundle of {wanted} in {self._repository}{others}")
        source = newest(candidates)
        # (before the next await: another load's collection cannot come in between)
        self._rolling_out[source.bundle_id] = self._rolling_out.get(source.bundle_id, 0) + 1
        try:
            await self._runtime.rollout(
                source,
                watch_s=self._config.rollout_watch_s,
                keep_previous_s=self._config.keep_previous_s,
            )
        finally:  # loaded now (the runtime's in use) or refused (collected by the next scan)
            self._rolling_out[source.bundle_id] -= 1
            if not self._rolling_out[source.bundle_id]:
                del self._rolling_out[source.bundle_id]
        return source.model.version

    async def rollback(self, name: str) -> str:
        self._check_request(name)
        return await self._runtime.rollback(name, keep_previous_s=self._config.keep_previous_s)

    async def unload(self, name: str, version: object = "") -> None:
        self._check_request(name)
        label = version_parameter(version)
        await self._runtime.unload(name, label)
