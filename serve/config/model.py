"""The model's configuration: what ``model.toml`` (or a bundle's manifest) holds.

Tensor shapes leave out the batch dimension when ``max_batch_size > 0`` (Triton's convention); -1
marks a variable dimension.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

MODEL_CONFIG_FILE = "model.toml"
LIVENESS_SERVICE = "liveness"  # gRPC health service names the server itself answers
READINESS_SERVICE = "readiness"
RESERVED_NAMES = (LIVENESS_SERVICE, READINESS_SERVICE)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
Backend = Literal["onnx", "torch"]


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    datatype: str
    shape: tuple[int, ...]


class BatchingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_queue_delay_us: int = 0  # how long the oldest request may wait for a fuller batch
    # While the serving process's event loop is saturated, hold a lone request (at most ~2 ms)
    # for company (2 to 8 rows, adapting): divides the per-batch costs when the front end is the
    # bottleneck; never applies to an idle or lightly loaded server.
    hold_when_saturated: bool = True
    max_queue_size: int = 1024  # requests waiting; beyond it callers get RESOURCE_EXHAUSTED
    buckets: tuple[int, ...] = ()  # batch sizes warmed and padded to; () = powers of two
    pad_to_bucket: bool | None = None  # None: the backend decides (fixed shapes for torch)


CUDA_IDLE_SPIN_US = 2000.0  # pool.idle_spin_us = -1 on a CUDA device: longer than a round trip


class PoolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    workers: int = 1
    max_inflight_per_worker: int = 2  # batches queued on one worker (hides the IPC round trip)
    startup_timeout_s: float = 300.0  # spawn → warm; a worker slower than this is killed
    threads: int = 0  # intra-op threads per worker; 0 = available CPUs / workers (serve/cpus.py)
    shm_slot_bytes: int = 0  # shared memory per in-flight batch and direction; 0 = derived
    # "template": fork workers from a process that has imported the framework (fast
    # replacement); "spawn": a fresh interpreter per worker
    worker_start: Literal["template", "spawn"] = "template"
    min_warm: int = 0  # warm workers that must pass probes for the model to be ready; 0 = workers
    max_workers: int = 0  # the controller may scale up to this; 0 = max(workers, min_warm)
    watchdog_s: float = 30.0  # a batch running longer than this means the worker hangs: kill it
    p95_target_ms: float = 0.0  # scale up while the model's P95 stays above it; 0 = no target
    scale_up_after_s: float = 10.0  # how long P95 / queue depth must stay over target
    scale_down_after_s: float = 60.0  # quiet time before an extra worker is retired
    # after each batch a worker busy-polls its channel this long before it sleeps (while the
    # last wait for a batch was no longer): a batch that comes in meanwhile skips the wake-up of
    # a sleeping process (low-concurrency latency) at the price of up to a core per worker;
    # 0 = sleep at once; -1 = auto: CUDA_IDLE_SPIN_US on
    # a CUDA device (where it took 0.21 ms off ResNet-50's p50 at concurrency 1), 0 on the CPU
    # (where the worker shares the cores with the server and the callers)
    idle_spin_us: float = -1.0

    @property
    def warm_floor(self) -> int:
        return self.min_warm or self.workers

    @property
    def worker_ceiling(self) -> int:
        return max(self.max_workers, self.workers, self.warm_floor)


class ProbeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The real inference each warm worker runs periodically to prove it can serve."""

    interval_s: float = 5.0
    timeout_s: float = 5.0
    # consecutive failed probes before the worker is replaced; as many live batches failing in
    # the model in a row get the worker probed at once (the probe decides, not the failures)
    failures_to_replace: int = 2
    inputs_file: str = ""  # .npz, one array per input (batch dim included); "" = generated
    expected_file: str = ""  # .npz of expected outputs; "" = check names, shapes, types, finite
    rtol: float = 1e-3
    atol: float = 1e-5


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    backend: Backend
    model_file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda" (= "cuda:0") or "cuda:N"
    version: str = "1"
    latency_budget_ms: float = 0.0  # a probe slower than this fails; 0 = only probe.timeout_s
    process: str = ""  # a Python module of the model folder with preprocess / postprocess
    reference_profile: str = ""  # a file of the model folder describing reference inputs
    model_inputs: tuple[str, ...] = ()  # the model's own input names when process renames them
    model_outputs: tuple[str, ...] = ()  # the model's own output names when process renames them
    batching: BatchingConfig = BatchingConfig()
    pool: PoolConfig = PoolConfig()
    probe: ProbeConfig = ProbeConfig()
    directory: str = ""  # filled in by the loader: the model's folder

    @property
    def model_path(self) -> Path:
        return Path(self.directory) / self.model_file

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        """Batch sizes a worker warms up on (empty for a model without a batch dimension)."""
        if self.max_batch_size <= 0:
            return ()
        if self.batching.buckets:
            return tuple(sorted(set(self.batching.buckets)))
        sizes = {
            1 << i for i in range(self.max_batch_size.bit_length()) if 1 << i <= self.max_batch_size
        }
        sizes.add(self.max_batch_size)
        return tuple(sorted(sizes))
