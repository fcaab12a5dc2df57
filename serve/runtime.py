"""The serving core as one object: model versions → batchers → warm worker pools.

``Runtime`` is what the gRPC front end adapts, and what an application can use in-process to get
the same warm pool and batching without a network hop::

    runtime = Runtime(scan(Path("models"), BundleCache(cache_dir / "bundles"))[0])
    await runtime.start()
    response = await runtime.infer(InferRequest("mlp_onnx", [Tensor("INPUT0", Datatype.FP32, x)]))

Each model has versions side by side, one of them active. A request may pin a version; otherwise
the active one serves. ``rollout()`` starts a new version's own warm pool, waits for its probes,
switches the active version in one step, watches it, and rolls back on its own if it falters.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.bundles.repository import ModelSource, newest
from serve.bundles.verify import verify_bundle_again
from serve.config import ModelConfig
from serve.cpus import throttle_watch
from serve.errors import InvalidBundleError, ModelNotFoundError, ModelNotReadyError
from serve.model_service import ModelService, ModelState, ModelStatus
from serve.protocol import InferRequest, InferResponse
from serve.readiness.controller import DECISION_WINDOW_S, MIN_SAMPLES
from serve.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

WATCH_TICK_S = 0.5
# A model whose first start failed (no worker warmed up and passed its probes) is started again
# after these delays, doubling up to the second: the cause may pass (GPU memory held by another
# process on a shared GPU, a file system late to mount), and nothing else would restart it
# outside Kubernetes. A bundle changed or gone since its scan is not tried again.
START_AGAIN_S = (5.0, 300.0)


class ModelStartFailedError(InvalidBundleError):
    """A version did not become ready because the model itself fails to load or warm up:
    not a transient condition (FAILED_PRECONDITION, as an invalid bundle: asking again gets
    the same answer until the bundle or the server's devices change)."""


@dataclass
class ModelEntry:
    name: str
    versions: dict[str, ModelService] = field(default_factory=dict)
    sources: dict[str, ModelSource] = field(default_factory=dict)  # loaded, and ``previous``
    active: str = ""
    previous: str = ""
    switches: int = 0  # how many times ``active`` changed: tells a keep period it is stale
    rolled_back: dict[str, str] = field(default_factory=dict)  # version → why its watch did
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def active_service(self) -> ModelService | None:
        return self.versions.get(self.active)


class Runtime:
    def __init__(
        self,
        models: Sequence[ModelSource | ModelConfig],
        *,
        log_level: str = "INFO",
        require_gpu: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self._log_level = log_level
        self._require_gpu = require_gpu  # every "auto" model must get a GPU (ServerConfig)
        self._listeners: list[Callable[[], None]] = []
        self._entries: dict[str, ModelEntry] = {}
        # Model control: one change at a time per model, each run as a task of this runtime's,
        # so a caller that goes away (a deadline, a disconnect) leaves no half-made change
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}  # changes holding or awaiting each model's lock
        self._control_tasks: set[asyncio.Task[Any]] = set()
        for item in models:
            source = item if isinstance(item, ModelSource) else ModelSource(item)
            entry = self._entries.setdefault(source.model.name, ModelEntry(source.model.name))
            entry.sources[source.model.version] = source
            entry.versions[source.model.version] = self._service(source)
        self.metrics.watch(self._gauges)

    def _service(self, source: ModelSource) -> ModelService:
        return ModelService(
            source.model,
            log_level=self._log_level,
            require_gpu=self._require_gpu,
            on_change=self._changed,
            metrics=self.metrics,
            bundle_id=source.bundle_id,
        )

    def _gauges(self) -> list[tuple[str, int, int, int]]:
        gauges = []
        for entry in self._entries.values():
            service = entry.active_service()
            if service is not None:
                healthy = len(service.controller.healthy_workers())
                depth = service.batcher.queue_depth
                gauges.append((entry.name, depth, service.pool.warm_count, healthy))
        return gauges

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a model's readiness may have changed."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    async def start(self) -> None:
        """Start every version; each model's newest ready version becomes active. A model none
        of whose versions started is started again in the background (START_AGAIN_S)."""
        await asyncio.gather(*(s.start() for s in self.services()))
        for entry in self._entries.values():
            ready = [entry.sources[v] for v, s in entry.versions.items() if s.ready]
            entry.active = newest(ready).model.version if ready else ""
            if not entry.active and entry.sources:
                entry.active = newest(list(entry.sources.values())).model.version
                self._spawn(entry, self._start_again(entry, entry.sources[entry.active]))
        self._changed()

    async def _start_again(self, entry: ModelEntry, source: ModelSource) -> None:
        """Start ``source`` (its model's active version, which failed its first start) again
        after a back-off, until it is ready, the model changes meanwhile, or the server stops."""
        name, version = source.key
        delay, attempt = START_AGAIN_S[0], 1
        while True:
            service = entry.versions.get(version)
            reason = service.readiness_reason() if service is not None else "not loaded"
            log.warning(
                "model %s version %s is not serving (%s); starting it again in %.0f s",
                name, version, reason or "not ready", delay,
            )  # fmt: skip
            await asyncio.sleep(delay)
            attempt += 1
            try:
                done = await self._control(
                    name, "start again", self._start_once_more(entry, source)
                )
            except ModelStartFailedError:  # (the cause may pass: GPU memory, a late mount)
                done = False
            except InvalidBundleError as exc:
                log.error("model %s version %s: not started again: %s", name, version, exc)
                return
            except ModelNotReadyError:
                done = False
            if done:
                return
            delay = min(delay * 2, START_AGAIN_S[1])

    async def _start_once_more(self, entry: ModelEntry, source: ModelSource) -> bool:
        """Under the model's lock: start ``source`` again if it is still its model's active,
        unready version (True once it serves, or when there is nothing left to do)."""
        name, version = source.key
        service = entry.versions.get(version)
        if self._entries.get(name) is not entry or entry.active != version or service is None:
            return True  # unloaded or changed by model control meanwhile: theirs now
        if service.ready:
            return True
        await self._rollout(source, watch_s=0.0, keep_previous_s=0.0)  # raises if still not ready
        log.info("model %s version %s serves after starting again", name, version)
        return True

    async def stop(self) -> None:
        """The server stops: its calls are answered or cancelled already (the gRPC grace period
        is over), so running batches are not waited for; workers get their stop timeout."""
        for task in list(self._control_tasks):
            task.cancel()
        await asyncio.gather(*self._control_tasks, return_exceptions=True)
        for entry in self._entries.values():
            for task in list(entry.tasks):
                task.cancel()
            await asyncio.gather(*entry.tasks, return_exceptions=True)
        await asyncio.gather(
            *(s.stop(batch_wait_s=0) for s in self.services()), return_exceptions=True
        )

    @property
    def live(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        """Every model's active version is ready, and there is at least one. A model loaded for
        the first time by model control has no active version until it is ready: it is not
        served yet and does not hold back the server's readiness (nor does one whose active
        version was unloaded)."""
        served = [name for name, entry in self._entries.items() if entry.active]
        return bool(served) and all(self.model_ready(name) for name in served)

    def model_names(self) -> list[str]:
        return list(self._entries)

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            return self.service(name, version).ready
        except (ModelNotFoundError, ModelNotReadyError):
            return False

    def service(self, name: str, version: str = "") -> ModelService:
        """The pinned version, or the active one."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(
                f"unknown model {name!r}; serving: {', '.join(self._entries) or 'none'}"
            )
        if version:
            service = entry.versions.get(version)
            if service is None:
                raise ModelNotFoundError(
                    f"model {name!r} has no version {version!r}; loaded: "
                    + ", ".join(entry.versions)
                )
            return service
        service = entry.active_service()
        if service is None:
            raise ModelNotReadyError(f"model {name!r} has no active version")
        return service

    def versions(self, name: str) -> list[ModelService]:
        """Every loaded version of ``name`` (NOT_FOUND for an unknown model)."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return list(entry.versions.values())

    def bundles_in_use(self) -> set[str]:
        """The bundle ids of every loaded version (and of each model's previous version, which
        a rollback warms up again)."""
        return {s.bundle_id for e in self._entries.values() for s in e.sources.values()} - {""}

    def services(self) -> list[ModelService]:
        return [s for e in self._entries.values() for s in e.versions.values()]

    def statuses(self) -> list[ModelStatus]:
        return [
            ModelStatus(
                s.config.name,
                s.config.version,
                s.state,
                s.readiness_reason() or ("" if v == e.active else "loaded, not the active version"),
            )
            for e in self._entries.values()
            for v, s in e.versions.items()
        ]

    async def infer(self, request: InferRequest) -> InferResponse:
        return await self.service(request.model_name, request.model_version).infer(request)

    # -- versions -------------------------------------------------------------------------

    async def rollout(self, source: ModelSource, *, watch_s: float, keep_previous_s: float) -> None:
        """Warm ``source`` beside the active version, switch to it once its probes pass, watch it.

        Raises (and keeps serving the old version) when the new one fails to warm or pass its
        probes. During ``watch_s`` after the switch a failing probe or a P95 over the latency
        budget switches back; the old version stays warm ``keep_previous_s`` for that. A caller
        that stops waiting does not stop the rollout.
        """
        work = self._rollout(source, watch_s=watch_s, keep_previous_s=keep_previous_s)
        await self._control(source.model.name, "rollout", work)

    async def _control(self, name: str, what: str, work: Coroutine[Any, Any, Any]) -> Any:
        """Run ``work`` after any other change to model ``name``, as this runtime's task."""

        async def locked() -> Any:
            lock = self._locks.setdefault(name, asyncio.Lock())
            self._lock_users[name] = self._lock_users.get(name, 0) + 1
            try:
                async with lock:
                    return await work
            finally:  # nobody holds or awaits it: forgotten (else one per name ever asked for)
                self._lock_users[name] -= 1
                if not self._lock_users[name]:
                    del self._lock_users[name], self._locks[name]

        return await self.run_to_end(name, what, locked())

    async def run_to_end(self, name: str, what: str, work: Coroutine[Any, Any, Any]) -> Any:
        """Run ``work`` (a change to model ``name``: ``what``) as this runtime's task: a caller
        that stops waiting (a deadline, a disconnect) does not stop it; only ``stop()`` does.
        Its outcome is logged, and returned to (or raised in) the caller if still there."""
        task = asyncio.create_task(work)
        self._control_tasks.add(task)
        task.add_done_callback(functools.partial(self._control_done, name, what))
        return await asyncio.shield(task)

    def _control_done(self, name: str, what: str, task: asyncio.Task[Any]) -> None:
        self._control_tasks.discard(task)
        if task.cancelled():
            log.warning("model %s: %s cancelled (the server is stopping)", name, what)
        elif (exc := task.exception()) is not None:  # (its caller, if still there, gets it too)
            log.warning("model %s: %s failed: %s: %s", name, what, type(exc).__name__, exc)

    async def _rollout(
        self, source: ModelSource, *, watch_s: float, keep_previous_s: float
    ) -> None:
        name, version = source.key
        entry = self._entries.setdefault(name, ModelEntry(name))
        loaded = entry.sources.get(version)
        if loaded is not None and loaded.bundle_id != source.bundle_id:
            held = (
                "is loaded"
                if version in entry.versions
                else "is the previous version (kept for a rollback)"
            )
            raise InvalidBundleError(
                f"model {name!r} version {version!r} {held} with different content "
                f"(bundle {loaded.bundle_id[:12] or 'unverified'}); a version label names one "
                "bundle: give the new bundle a new version"
            )
        if loaded is not None and version == entry.active and entry.versions[version].ready:
            log.info("model %s version %s is already active", name, version)
            return
        service = entry.versions.get(version)
        if service is None or service.state is not ModelState.READY:
            try:  # (a bundle gone or changed since its scan: every worker would refuse it)
                await asyncio.to_thread(_check_bundle, source)
            except InvalidBundleError:
                if not entry.versions:  # a model loaded for the first time: not there at all
                    await self._drop(name)
                raise
            stale, service = service, self._service(source)
            entry.versions[version], entry.sources[version] = service, source
            await service.start()
            if stale is not None:  # a version that was no longer ready, replaced
                await stale.drain()
        if not service.ready:
            reason = service.readiness_reason() or "not ready"
            if version != entry.active:
                del entry.versions[version]
                _forget_source(entry, version)
                await _stop_removed(service)
                if not entry.versions:  # a model loaded for the first time: not there at all
                    await self._drop(name)
                    self._changed()
            log.error("rollout of %s version %s refused: %s", name, version, reason)
            # the model's own failure is not retried by asking again; anything else may pass
            error = ModelStartFailedError if service.model_failed else ModelNotReadyError
            raise error(
                f"model {name!r} version {version!r} did not become ready ({reason}); "
                f"still serving version {entry.active or 'none'}"
            )
        entry.rolled_back.pop(version, None)  # rolled out again on purpose: another chance
        self._switch(entry, version, f"rollout (bundle {source.bundle_id[:12] or 'unverified'})")
        if entry.previous:
            self._spawn(entry, self._watch(entry, version, watch_s, keep_previous_s))

    async def rollback(self, name: str, *, keep_previous_s: float) -> str:
        """Return to the previous version: at once if it is still warm, else by a rollout.
        Refused (InvalidBundleError) when the previous version is one its rollout watch rolled
        back: rolling it out again is a load by version."""
        target: str = await self._control(
            name, "rollback", self._rollback(name, keep_previous_s=keep_previous_s)
        )
        return target

    async def _rollback(self, name: str, *, keep_previous_s: float) -> str:
        entry = self._entries.get(name)
        if entry is None or not entry.previous:
            raise ModelNotFoundError(f"model {name!r} has no previous version to roll back to")
        target = entry.previous
        if target in entry.rolled_back:
            raise InvalidBundleError(
                f"model {name!r}: not rolling back to version {target!r}: it was rolled back "
                f"automatically during its rollout watch ({entry.rolled_back[target]}); "
                f"load version {target!r} explicitly to try it again"
            )
        service = entry.versions.get(target)
        if service is not None and service.ready:
            self._switch(entry, target, "rollback")
            self._spawn(entry, self._retire_later(entry, entry.previous, keep_previous_s))
        else:  # retired since (its source is kept for this): warmed again, then switched to
            await self._rollout(entry.sources[target], watch_s=0, keep_previous_s=keep_previous_s)
        return target

    async def unload(self, name: str, version: str = "") -> None:
        await self._control(name, "unload", self._unload(name, version))

    async def _unload(self, name: str, version: str) -> None:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"unknown model {name!r}")
        if version and version not in entry.versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r} loaded")
        for v in [version] if version else list(entry.versions):
            service = entry.versions.pop(v, None)
            if service is None:  # retired (its keep period, its watch) while another drained
                continue
            if v == entry.active:
                entry.active = ""
            if v == entry.previous:  # unloaded on purpose: not a version to roll back to
                entry.previous = ""
            _forget_source(entry, v)
            await _drain_removed(service)
        if not entry.versions:
            await self._drop(name)
        self._changed()

    async def _drop(self, name: str) -> None:
        """Forget a model none of whose versions is loaded any more: its watch and keep-warm
        tasks (nothing is left for them to switch to or retire) and its metrics too. Returns
        once those tasks are over: a version one was retiring is stopped by then (the model is
        no longer listed, so ``stop()`` would not see it)."""
        tasks = list(self._entries.pop(name).tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.metrics.forget(name)

    def _switch(self, entry: ModelEntry, version: str, why: str) -> None:
        if entry.active == version:
            return
        replaced = entry.previous
        entry.previous, entry.active = entry.active, version  # one step: new calls go to it
        entry.switches += 1
        _forget_source(entry, replaced)  # no longer a rollback target
        log.info("model %s: version %s → %s (%s)", entry.name, entry.previous, version, why)
        self._changed()

    def _spawn(self, entry: ModelEntry, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        entry.tasks.add(task)
        task.add_done_callback(functools.partial(self._spawned_done, entry))

    @staticmethod
    def _spawned_done(entry: ModelEntry, task: asyncio.Task[None]) -> None:
        entry.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                "model %s: watching or retiring a version failed",
                entry.name,
                exc_info=(type(exc), exc, exc.__traceback__),
            )

    async def _watch(self, entry: ModelEntry, version: str, watch_s: float, keep_s: float) -> None:
        service, old = entry.versions[version], entry.previous
        budget = service.config.latency_budget_ms
        loop = asyncio.get_running_loop()
        end = loop.time() + watch_s
        warned = throttled_said = False
        while loop.time() < end and entry.active == version:
            await asyncio.sleep(WATCH_TICK_S)  # the watch window's period
            if entry.active != version:  # replaced meanwhile (a rollback, a newer rollout)
                break
            p95 = service.latency.end_to_end.percentiles(last_s=DECISION_WINDOW_S)
            reason = ""
            if not service.ready:
                reason = service.readiness_reason() or "not ready"
            elif budget and p95.count >= MIN_SAMPLES and p95.p95_ms > budget:
                if throttle_watch().throttled_within(DECISION_WINDOW_S):
                    # The CPU limit's pauses: the old version would wait just the same.
                    if not throttled_said:
                        throttled_said = True
                        log.info(
                            "model %s version %s: P95 %.1f ms over the %g ms budget while the "
                            "CPU limit stops this server: not held against the version",
                            entry.name,
                            version,
                            p95.p95_ms,
                            budget,
                        )
                else:
                    reason = f"P95 {p95.p95_ms:.1f} ms over the {budget:g} ms budget"
            old_service = entry.versions.get(old)
            if reason and old_service is not None and old_service.ready:
                log.error(
                    "model %s version %s rolled back to %s: %s", entry.name, version, old, reason
                )
                entry.rolled_back[version] = reason
                self._switch(entry, old, f"automatic rollback: {reason}")
                await self._retire(entry, version)
                return
            if reason and not warned:
                warned = True  # once per watch: it goes on watching
                why = "not loaded" if old_service is None else old_service.readiness_reason()
                log.warning(
                    "model %s version %s falters in its rollout watch (%s) but version %s is "
                    "not ready to take over (%s): no automatic rollback, still serving %s",
                    entry.name, version, reason, old, why or "not ready", version,
                )  # fmt: skip
        await self._retire_later(entry, old, keep_s)

    async def _retire_later(self, entry: ModelEntry, version: str, keep_s: float) -> None:
        switches, kept = entry.switches, entry.versions.get(version)
        await asyncio.sleep(keep_s)  # kept warm for an instant rollback until then
        if not version or version == entry.active:
            return
        if version == entry.previous and entry.switches != switches:
            return  # the previous version again since: that switch's own keep period counts
        if entry.versions.get(version) is not kept:
            return  # unloaded or retired since, and loaded again: not the one this kept warm
        await self._retire(entry, version)

    async def _retire(self, entry: ModelEntry, version: str) -> None:
        service = entry.versions.pop(version, None)
        _forget_source(entry, version)
        if service is not None:
            log.info("model %s: retiring version %s", entry.name, version)
            await _drain_removed(service)
            self._changed()


def _check_bundle(source: ModelSource) -> None:
    """InvalidBundleError, naming the file, when the bundle of ``source`` is no longer what it
    was when it was verified (deleted, changed on disk); a model folder is not checked."""
    if source.bundle_id and source.model.directory:
        verify_bundle_again(Path(source.model.directory), source.bundle_id)


def _forget_source(entry: ModelEntry, version: str) -> None:
    """Forget the source of ``version`` once nothing needs it: it is not loaded and not the
    previous version (a rollback to a previous version retired since rolls its source out)."""
    if version not in entry.versions and version not in (entry.active, entry.previous):
        entry.sources.pop(version, None)
        entry.rolled_back.pop(version, None)


async def _stop_removed(service: ModelService) -> None:
    """Stop a version already taken out of its model's versions, even if the server stops
    meanwhile (this task cancelled): Runtime.stop no longer sees it."""
    try:
        await service.stop()
    except asyncio.CancelledError:
        await service.stop(batch_wait_s=0)
        raise


async def _drain_removed(service: ModelService) -> None:
    """Drain a version already taken out of its model's versions; if the server stops meanwhile
    (this task cancelled), stop it anyway: Runtime.stop no longer sees it."""
    try:
        await service.drain()
    except asyncio.CancelledError:
        await service.stop(batch_wait_s=0)
        raise
