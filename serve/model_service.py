"""One model version as a service: validation, its batcher, its worker pool, its controller."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from serve.batching import BatchResult, DynamicBatcher
from serve.batching.batcher import STOP_WAIT_S
from serve.batching.merge import Array
from serve.config import ModelConfig, TensorSpec
from serve.errors import InvalidInputError, ModelFaultError, ModelNotReadyError, ServeError
from serve.memory import refreeze_soon
from serve.pool.pool import WorkerPool
from serve.protocol import Datatype, InferRequest, InferResponse, Tensor
from serve.protocol.tensors import Parameters
from serve.readiness.controller import WarmPoolController
from serve.readiness.latency import ModelLatency
from serve.telemetry.metrics import Metrics, outcome
from serve.telemetry.stats import ModelStats

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 60.0


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    version: str
    state: ModelState
    reason: str


def _describe(spec: TensorSpec, batched: bool) -> str:
    dims = ([-1] if batched else []) + list(spec.shape)
    return f"{spec.datatype} {dims}"


class ModelService:
    """One model version: validation, its batcher, its worker pool and its controller."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        log_level: str = "INFO",
        require_gpu: bool = False,
        on_change: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
        bundle_id: str = "",
    ) -> None:
        self.config = config
        self.bundle_id = bundle_id
        self._metrics = metrics or Metrics()
        self._counters = self._metrics.counters(config.name)
        self.stats = ModelStats()
        self.latency = ModelLatency()
        self.state = ModelState.LOADING
        self.reason = "loading"
        # its last start failed because the model itself cannot load or warm up (a worker
        # said so), not for a passing reason (the host, a timeout, a stop)
        self.model_failed = False
        self._notify = on_change or (lambda: None)
        self.pool = WorkerPool(
            config,
            log_level=log_level,
            require_gpu=require_gpu,
            on_change=self._pool_changed,
            bundle_id=bundle_id,
        )
        self.batcher = DynamicBatcher(
            config.name,
            self.pool,
            max_batch_size=config.max_batch_size,
            max_queue_delay_us=config.batching.max_queue_delay_us,
            hold_when_saturated=config.batching.hold_when_saturated,
            max_queue_size=config.batching.max_queue_size,
            observer=self,
        )
        self.controller = WarmPoolController(
            config, self.pool, self.latency, lambda: self.batcher.queue_depth, self._notify
        )
        self._batched = config.max_batch_size > 0
        self._input_types = {s.name: Datatype(s.datatype) for s in config.inputs}
        self._input_dims = {
            s.name: ((-1,) if self._batched else ()) + tuple(s.shape) for s in config.inputs
        }
        self._output_names = [s.name for s in config.outputs]
        self._output_types = [(s.name, Datatype(s.datatype)) for s in config.outputs]
        self._parameters: Parameters = {"bundle_id": bundle_id} if bundle_id else {}
        # The front end's codec for this version's common requests, made on first use.
        self.codec: Any = None

    @property
    def parameters(self) -> Parameters:
        """What every response of this version carries in its parameters (a copy)."""
        return dict(self._parameters)

    def _pool_changed(self) -> None:
        live = {w.worker_id for w in self.pool.workers}
        for gone in [w for w in self.latency.workers if w not in live]:
            self.latency.forget_worker(gone)  # a dead worker's window (up to 8192 samples)
        self.controller.kick()  # probe a newly warm worker now, not at the next period
        self._notify()

    @property
    def ready(self) -> bool:
        """Loaded, and at least ``min_warm`` warm workers passed their latest probe."""
        return (
            self.state is ModelState.READY
            and len(self.controller.healthy_workers()) >= self.config.pool.warm_floor
        )

    @property
    def device(self) -> str:
        """Where this version runs: what its warm workers report ("cpu", "cuda:0"; a model's
        "auto" resolved), else the configured device."""
        for worker in self.pool.warm_workers():
            if worker.ready is not None:
                return worker.ready.device
        return self.config.device

    @property
    def can_serve(self) -> bool:
        """At least one warm worker (traffic is still served below the warm floor)."""
        return self.state is ModelState.READY and self.pool.has_warm()

    def readiness_reason(self) -> str:
        if self.state is not ModelState.READY:
            return self.reason
        healthy = len(self.controller.healthy_workers())
        floor = self.config.pool.warm_floor
        if healthy >= floor:
            return ""
        last = self.controller.last_failure
        trouble = self.pool.start_trouble()  # (replacements that fail to start say why)
        return (
            f"{healthy} of {floor} warm workers pass their probes"
            + (f"; {trouble}" if trouble else "")
            + (f"; last failure: {last}" if last else "")
        )

    async def start(self) -> None:
        """Start the workers, probe each by real inference, then take traffic."""
        try:
            await self.pool.start()
            self.batcher.start()
            await self.controller.probe_all()
        except Exception as exc:
            self.state = ModelState.UNAVAILABLE
            self.reason = str(exc)
            self.model_failed = isinstance(exc, ModelFaultError)
            log.error("model %s failed to load: %s", self.config.name, exc)
            await self.batcher.stop()
            await self.pool.stop()
            self._notify()
            return
        self.state = ModelState.READY
        self.reason = ""
        self.model_failed = False
        self.controller.start()
        healthy, floor = len(self.controller.healthy_workers()), self.config.pool.warm_floor
        if healthy >= floor:
            log.info(
                "model %s version %s ready: %d of %d warm workers pass their probes",
                self.config.name,
                self.config.version,
                healthy,
                floor,
            )
        else:  # (loaded: the controller goes on probing and replacing)
            log.warning(
                "model %s version %s loaded but not ready: %s",
                self.config.name,
                self.config.version,
                self.readiness_reason(),
            )
        self._notify()

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Let requests already routed here finish (none new arrive), then stop."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.batcher.drain()
        except TimeoutError:
            log.warning(
                "model %s version %s: drain timed out", self.config.name, self.config.version
            )
        await self.stop(batch_wait_s=0)  # the drain was the wait

    async def stop(self, batch_wait_s: float = STOP_WAIT_S) -> None:
        """Stop taking requests (queued ones fail UNAVAILABLE), wait up to ``batch_wait_s`` for
        running batches, then stop the workers."""
        self.state = ModelState.UNAVAILABLE
        self.reason = "stopped"
        await self.controller.stop()
        await self.batcher.stop(batch_wait_s)
        await self.pool.stop()
        self._notify()
        # (this version's objects, frozen if it started with the server, become garbage)
        refreeze_soon(f"model {self.config.name} version {self.config.version} stopped")

    def forget_warm_up(self) -> None:
        """Start statistics, latency windows and metrics from zero: the front end's own warm-up
        calls (before readiness opens) are not traffic."""
        self.stats = ModelStats()
        self.latency.clear()
        self._counters.reset()

    def batch_done(
        self, rows: int, requests: int, queue_ns: Sequence[int], result: BatchResult | None
    ) -> None:
        """Batcher observer: cumulative statistics and the rolling latency windows."""
        self.stats.batch_done(rows, requests, queue_ns, result)
        self._counters.batch(rows)
        now = time.monotonic()
        latency = self.latency
        for ns in queue_ns:
            latency.queue.add(ns / 1e9, now)
        if result is not None:
            latency.batches.add(rows, now)
            if result.timings_ns:  # PHASES order: compute is third, the round trip fifth
                latency.compute.add(result.timings_ns[2] / 1e9, now)
                latency.worker(result.worker).add(result.timings_ns[4] / 1e9, now)

    def prepare(self, request: InferRequest) -> tuple[list[Array], int]:
        """Check the request against the signature; the inputs in model order and the row count."""
        tensors = request.inputs
        specs = self.config.inputs
        if len(tensors) == len(specs) and all(
            t.name == s.name for t, s in zip(tensors, specs, strict=True)
        ):
            arrays = [self._check_tensor(s, t) for s, t in zip(specs, tensors, strict=True)]
        else:
            arrays = self._inputs_by_name(tensors)
        rows = 1
        if self._batched:
            rows = int(arrays[0].shape[0])
            for spec, array in zip(specs, arrays, strict=True):
                if array.shape[0] != rows:
                    raise InvalidInputError(
                        f"model {self.config.name!r}: input {spec.name!r} has batch size "
                        f"{array.shape[0]} but input {specs[0].name!r} has {rows}"
                    )
        if request.outputs is not None:
            for name in request.outputs:
                if name not in self._output_names:
                    raise InvalidInputError(
                        f"model {self.config.name!r} has no output {name!r}; its outputs are: "
                        + ", ".join(self._output_names)
                    )
        return arrays, rows

    def _inputs_by_name(self, tensors: list[Tensor]) -> list[Array]:
        """The inputs in model order when the request names them in another order (or wrongly)."""
        model = self.config
        given = {t.name: t for t in tensors}
        if len(given) != len(tensors):
            raise InvalidInputError(f"model {model.name!r}: an input name appears twice")
        unknown = sorted(set(given) - set(self._input_types))
        if unknown:
            expected = ", ".join(s.name for s in model.inputs)
            raise InvalidInputError(
                f"model {model.name!r} has no input {unknown[0]!r}; its inputs are: {expected}"
            )
        arrays: list[Array] = []
        for spec in model.inputs:
            tensor = given.get(spec.name)
            if tensor is None:
                raise InvalidInputError(
                    f"model {model.name!r} expects input {spec.name!r} "
                    f"({_describe(spec, self._batched)}); the request does not have it"
                )
            arrays.append(self._check_tensor(spec, tensor))
        return arrays

    def _check_tensor(self, spec: TensorSpec, tensor: Tensor) -> Array:
        model = self.config
        expected = self._input_types[spec.name]
        if tensor.datatype is not expected:
            raise InvalidInputError(
                f"model {model.name!r} input {spec.name!r}: expected datatype {expected}, "
                f"got {tensor.datatype}"
            )
        data = tensor.data
        shape = data.shape
        dims = self._input_dims[spec.name]
        if len(shape) != len(dims) or any(
            d != -1 and d != s for d, s in zip(dims, shape, strict=True)
        ):
            raise InvalidInputError(
                f"model {model.name!r} input {spec.name!r}: expected shape {list(dims)}, "
                f"got {list(shape)}"
            )
        if self._batched and not 1 <= shape[0] <= model.max_batch_size:
            raise InvalidInputError(
                f"model {model.name!r} input {spec.name!r}: batch size {shape[0]} is outside "
                f"1..{model.max_batch_size} (max_batch_size)"
            )
        if data.size == 0:
            raise InvalidInputError(
                f"model {model.name!r} input {spec.name!r}: shape {list(shape)} has no elements"
            )
        return data

    def submit(
        self, inputs: list[Array], rows: int, deadline: float | None, timed: bool = False
    ) -> Awaitable[list[Array]]:
        """Queue checked inputs (prepare()'s, or a front end's own equivalent check); what to
        await for this request's rows of every output. The caller reports the outcome with
        request_ok() or request_failed(). A caller that gives up (cancelled) empties ``inputs``:
        the queue keeps the request until a worker frees or the queue fills, not its arrays."""
        if not self.can_serve:
            raise ModelNotReadyError(
                f"model {self.config.name!r} is not ready ({self.reason or 'no warm worker'})"
            )
        if timed and deadline is not None:
            return self.batcher.submit(inputs, rows, deadline)
        # no deadline, or the transport enforces it: no timer, no extra coroutine frame
        return self.batcher.enqueue(inputs, rows, deadline)

    def request_ok(self, started_ns: int, rows: int) -> None:
        """Count one answered request (``started_ns``: time.monotonic_ns() at its arrival)."""
        elapsed_ns = time.monotonic_ns() - started_ns
        self.stats.request_done(True, rows, elapsed_ns)
        elapsed = elapsed_ns / 1e9
        self.latency.end_to_end.add(elapsed)
        self._counters.request_ok(elapsed)

    def request_failed(self, started_ns: int, rows: int, exc: ServeError) -> None:
        self.stats.request_done(False, rows, time.monotonic_ns() - started_ns)
        self._counters.request_failed(outcome(exc))

    def request_abandoned(self, elapsed_ns: int, expired: bool) -> None:
        """Count a request whose call ended before its answer: at its deadline (``expired``:
        deadline_exceeded) or cancelled by its caller (cancelled)."""
        self.stats.request_done(False, 0, elapsed_ns)
        self._counters.request_failed("deadline_exceeded" if expired else "cancelled")

    async def infer(
        self,
        request: InferRequest,
        check_answer: Callable[[InferResponse], None] | None = None,
    ) -> InferResponse:
        """``check_answer``: the caller's last check of the answer (a ServeError from it fails
        the request, counted as such)."""
        started = time.monotonic_ns()
        rows = 0
        try:
            inputs, rows = self.prepare(request)
            try:
                outputs = await self.submit(inputs, rows, request.deadline, request.timed)
            except asyncio.CancelledError:
                inputs.clear()  # queued still: its arrays go now (submit)
                raise
        except ServeError as exc:
            self.request_failed(started, rows, exc)
            raise
        wanted = request.outputs
        if wanted is None and len(outputs) == 1:
            ((name, datatype),) = self._output_types
            tensors = [Tensor(name, datatype, outputs[0])]
        else:
            tensors = [
                Tensor(name, datatype, out)
                for (name, datatype), out in zip(self._output_types, outputs, strict=True)
                if wanted is None or name in wanted
            ]
        response = InferResponse(
            request.model_name,
            self.config.version,
            tensors,
            request.id,
            dict(self._parameters),
        )
        if check_answer is not None:
            try:
                check_answer(response)
            except ServeError as exc:
                self.request_failed(started, rows, exc)
                raise
        self.request_ok(started, rows)
        return response
