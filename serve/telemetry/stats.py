"""Cumulative per-model statistics in the shape of the protocol's statistics extension."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from serve.batching import BatchResult
from serve.batching.batcher import PHASES


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    """Counts since start: requests (success/fail), rows inferred, batches executed, phase times."""

    last_inference_ms: int = 0
    inference_count: int = 0  # rows (batch items) successfully inferred
    execution_count: int = 0  # batches run by a worker
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchSizeStats] = field(default_factory=dict)
    timed_batches: int = 0  # batches with phase timings
    phase_ns: list[int] = field(default_factory=lambda: [0] * len(PHASES))  # totals per PHASES
    decode: Duration = field(default_factory=Duration)  # protobuf → tensors, per request
    encode: Duration = field(default_factory=Duration)  # tensors → protobuf, per request

    def codec_done(self, decode_ns: int, encode_ns: int) -> None:
        self.decode.add(decode_ns)
        self.encode.add(encode_ns)

    def breakdown_us(self) -> dict[str, float]:
        """Average microseconds of each phase: per request (codec, queue), per batch (the rest)."""

        def avg(d: Duration) -> float:
            return d.ns / d.count / 1e3 if d.count else 0.0

        phases = {"grpc_decode": avg(self.decode), "queue": avg(self.queue)}
        if self.timed_batches:
            batches = self.timed_batches
            phases.update(
                {name: ns / batches / 1e3 for name, ns in zip(PHASES, self.phase_ns, strict=True)}
            )
            # the socket hops, beyond what the worker accounts for
            worker = sum(phases[k] for k in ("worker_input", "compute", "worker_output"))
            phases["ipc_wait"] = max(0.0, phases.pop("round_trip") - worker)
        phases["grpc_encode"] = avg(self.encode)
        return phases

    def request_done(self, ok: bool, rows: int, elapsed_ns: int) -> None:
        self.last_inference_ms = int(time.time() * 1000)
        if ok:
            success = self.success
            success.count += 1
            success.ns += elapsed_ns
            self.inference_count += rows
        else:
            self.fail.add(elapsed_ns)

    def batch_done(
        self, rows: int, requests: int, queue_ns: Sequence[int], result: BatchResult | None
    ) -> None:
        # Queue time as Triton counts it: once per request, with the batch that answered it
        # (perf_analyzer divides it by the success count). A request of a failed batch counts
        # in ``fail`` alone; one that runs again is not in ``queue_ns`` until its last batch.
        if result is None:
            return
        queue = self.queue
        queue.count += len(queue_ns)
        queue.ns += queue_ns[0] if len(queue_ns) == 1 else sum(queue_ns)
        self.execution_count += 1
        t = result.timings_ns
        if not t:
            return
        ipc_write, worker_input, compute_infer, worker_output, round_trip, ipc_read = t
        self.timed_batches += 1
        totals = self.phase_ns
        totals[0] += ipc_write
        totals[1] += worker_input
        totals[2] += compute_infer
        totals[3] += worker_output
        totals[4] += round_trip
        totals[5] += ipc_read
        compute_input = ipc_write + worker_input
        compute_output = worker_output + ipc_read
        total = self.compute_input
        total.count += requests
        total.ns += compute_input * requests
        total = self.compute_infer
        total.count += requests
        total.ns += compute_infer * requests
        total = self.compute_output
        total.count += requests
        total.ns += compute_output * requests
        per_size = self.batches.get(rows)
        if per_size is None:
            per_size = self.batches[rows] = BatchSizeStats()
        per_size.compute_input.count += 1
        per_size.compute_input.ns += compute_input
        per_size.compute_infer.count += 1
        per_size.compute_infer.ns += compute_infer
        per_size.compute_output.count += 1
        per_size.compute_output.ns += compute_output
