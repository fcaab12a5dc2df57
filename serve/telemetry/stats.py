"""Cumulative per-model statistics in the shape of the protocol's statistics extension."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from serve.batching import BatchResult


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

    def request_done(self, ok: bool, rows: int, elapsed_ns: int) -> None:
        self.last_inference_ms = int(time.time() * 1000)
        if ok:
            self.success.add(elapsed_ns)
            self.inference_count += rows
        else:
            self.fail.add(elapsed_ns)

    def batch_done(
        self, rows: int, requests: int, queue_ns: Sequence[int], result: BatchResult | None
    ) -> None:
        self.queue.add(sum(queue_ns), len(queue_ns))
        if result is None:
            return
        self.execution_count += 1
        t = result.timings_ns
        compute_input = t.get("ipc_write", 0) + t.get("worker_input", 0)
        compute_output = t.get("worker_output", 0) + t.get("ipc_read", 0)
        compute_infer = t.get("compute", 0)
        self.compute_input.add(compute_input * requests, requests)
        self.compute_infer.add(compute_infer * requests, requests)
        self.compute_output.add(compute_output * requests, requests)
        per_size = self.batches.setdefault(rows, BatchSizeStats())
        per_size.compute_input.add(compute_input)
        per_size.compute_infer.add(compute_infer)
        per_size.compute_output.add(compute_output)
