"""Probe by real inference: each warm worker runs the model's probe request through the same
shared-memory batch path as live traffic, and the answer is checked.

A probe passes when the outputs have the configured names, shapes and datatypes, are finite,
match the expected outputs within tolerance (when configured), and came back within the model's
latency budget. A worker busy with live traffic (a batch in flight, even with a slot free) that
answered a live batch within the probe interval is not probed that round: the probe would wait
in the worker behind that batch, and its timeout and latency budget would count the wait (a
healthy worker under load failed its probes). One busy without an answer for that long is
probed (a hung worker fails it), and a batch that never returns is the watchdog's case. Once
its live batches fail in the model, the probe takes the next slot that frees, ahead of them: a
busy worker cannot dodge its probe.

A probe over the latency budget during which the process's CPU limit stopped it (a period of its
CFS quota spent: serve/cpus.py) is not held against the worker: the kernel stopped the serving
process and the worker alike, and a new worker would wait just the same. It passes, and the log
says so. Wrong answers and timeouts fail as ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from serve.config import ModelConfig
from serve.cpus import ThrottleWatch
from serve.errors import ServeError
from serve.pool.pool import WorkerPool
from serve.pool.worker_handle import WorkerHandle
from serve.protocol.datatypes import Datatype, datatype_of, numpy_dtype
from serve.protocol.samples import sample_arrays

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    worker: WorkerHandle
    ok: bool
    reason: str
    latency_s: float


def _load_npz(path: Path) -> dict[str, npt.NDArray[Any]]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


class Prober:
    def __init__(
        self,
        model: ModelConfig,
        pool: WorkerPool,
        throttle: ThrottleWatch | None = None,
    ) -> None:
        """``throttle``: the process's CPU limit (cpus.throttle_watch); None: none."""
        self.model = model
        self.pool = pool
        self._throttle = throttle
        rows = 1 if model.max_batch_size > 0 else None
        if model.probe.inputs_file:
            given = _load_npz(Path(model.directory) / model.probe.inputs_file)
            self.inputs = [self._probe_input(given, s.name, s.datatype) for s in model.inputs]
        else:
            specs = [(s.name, s.datatype, s.shape) for s in model.inputs]
            arrays = sample_arrays(specs, rows, seed=1)
            self.inputs = [arrays[s.name] for s in model.inputs]
        self.rows = int(self.inputs[0].shape[0]) if model.max_batch_size > 0 else 1
        self.expected = (
            _load_npz(Path(model.directory) / model.probe.expected_file)
            if model.probe.expected_file
            else None
        )

    def _probe_input(
        self, given: dict[str, npt.NDArray[Any]], name: str, datatype: str
    ) -> npt.NDArray[Any]:
        if name not in given:
            raise ValueError(f"probe inputs file has no array {name!r}")
        if Datatype(datatype) is Datatype.BYTES:
            return given[name].astype(np.object_)
        return given[name].astype(numpy_dtype(Datatype(datatype)), copy=False)

    async def probe(self, worker: WorkerHandle) -> ProbeResult | None:
        """Probe one worker; None when it is busy with live traffic that succeeds. A busy
        worker whose latest live batch failed in the model is probed on the next slot it
        frees."""
        start = time.monotonic()
        timeout_s = self.model.probe.timeout_s
        serving = worker.busy and start - worker.last_success <= self.model.probe.interval_s
        lease = None if serving else self.pool.acquire_now(worker)
        if lease is None:
            if not worker.failed_in_a_row:
                return None
            try:
                lease = await self.pool.acquire_next(worker, timeout_s)
            except ServeError as exc:  # it died meanwhile
                return self._result(worker, start, str(exc))
            if lease is None:
                return self._result(
                    worker, start, f"busy, its batches failing, no slot free within {timeout_s:g} s"
                )
            start = time.monotonic()
        throttle = self._throttle
        before = None if throttle is None else throttle.periods()
        try:
            async with asyncio.timeout(timeout_s):
                result = await lease.run(self.inputs, self.rows)
        except TimeoutError:
            return self._result(worker, start, f"no answer within {timeout_s:g} s")
        except ServeError as exc:
            return self._result(worker, start, str(exc))
        latency = time.monotonic() - start
        reason = self.check(result.outputs)
        if not reason and (over := self.over_budget(latency)):
            after = None if throttle is None else throttle.periods()
            if before is not None and after is not None and after > before:
                log.info(
                    "worker %s: %s, but the CPU limit stopped this server meanwhile: not held "
                    "against the worker",
                    worker.worker_id,
                    over,
                )
            else:
                reason = over
        return self._result(worker, start, reason)

    def _result(self, worker: WorkerHandle, start: float, reason: str) -> ProbeResult:
        return ProbeResult(worker, not reason, reason, time.monotonic() - start)

    def check(self, outputs: list[npt.NDArray[Any]]) -> str:
        """Empty when the probe's answer is right; otherwise what was wrong with it."""
        model = self.model
        if len(outputs) != len(model.outputs):
            return f"{len(outputs)} outputs, expected {len(model.outputs)}"
        batch = (self.rows,) if model.max_batch_size > 0 else ()
        for spec, out in zip(model.outputs, outputs, strict=True):
            dims = batch + spec.shape
            if len(out.shape) != len(dims) or any(
                d != -1 and d != s for d, s in zip(dims, out.shape, strict=True)
            ):
                return f"output {spec.name!r} has shape {list(out.shape)}, expected {list(dims)}"
            if datatype_of(out) is not Datatype(spec.datatype):
                return f"output {spec.name!r} is {datatype_of(out)}, expected {spec.datatype}"
            if out.dtype.kind == "f" and not np.isfinite(out).all():
                return f"output {spec.name!r} has non-finite values"
            if self.expected is not None and spec.name in self.expected:
                want = self.expected[spec.name]
                if want.shape != out.shape or not np.allclose(
                    out, want, rtol=model.probe.rtol, atol=model.probe.atol
                ):
                    return f"output {spec.name!r} differs from the expected probe output"
        return ""

    def over_budget(self, latency_s: float) -> str:
        """Empty within the model's latency budget (or without one); otherwise by how much."""
        budget_ms = self.model.latency_budget_ms
        if budget_ms and latency_s * 1e3 > budget_ms:
            return f"probe took {latency_s * 1e3:.1f} ms, over the {budget_ms:g} ms budget"
        return ""
