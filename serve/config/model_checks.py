"""Checks of a model's configuration: anything that cannot be served (or would be served other
than as written) is refused naming the field, its value and what is allowed."""

from __future__ import annotations

import math
import re
from pathlib import Path

from serve.config.model import RESERVED_NAMES, ModelConfig
from serve.errors import InvalidBundleError
from serve.protocol.datatypes import parse_datatype


def validate_model(model: ModelConfig) -> None:
    """Raise InvalidBundleError naming the model, the field, its value and what is allowed, for
    anything that cannot be served (or would be served other than as written)."""
    problem = _model_problem(model)
    if problem:
        raise InvalidBundleError(
            f"model {model.name!r} ({model.directory or 'in code'}): {problem}"
        )


def _model_problem(model: ModelConfig) -> str:
    """The first thing wrong with ``model``'s configuration, or ""."""
    if not model.name or "/" in model.name:
        return f"name must be non-empty and contain no '/', got {model.name!r}"
    if model.name in RESERVED_NAMES:
        return f"{model.name!r} is a health service name; pick another model name"
    if not model.version or "/" in model.version or model.version.strip() != model.version:
        return (
            f"version must be non-empty, without '/' or surrounding spaces, got {model.version!r}"
        )
    if not model.model_file:
        return "model_file must name the model file, got ''"
    for check in (_tensors_problem, _batching_problem, _pool_problem, _probe_problem):
        if problem := check(model):
            return problem
    for label, file in model_files(model).items():
        if file and model.directory and not (Path(model.directory) / file).is_file():
            return f"{label} {file!r} does not exist in {model.directory}"
    if model.device not in ("auto", "cpu") and not _CUDA_DEVICE.fullmatch(model.device):
        return (
            f"device must be 'auto', 'cpu', 'cuda' (the first GPU) or 'cuda:N' (N = 0, 1, ...), "
            f"got {model.device!r}"
        )
    if not _at_least(model.latency_budget_ms, 0):
        return f"latency_budget_ms must be >= 0 (0: none), got {model.latency_budget_ms}"
    return ""


# "cuda" (as torch writes it: the first GPU) or "cuda:N" (ASCII digits: str.isdigit takes "²",
# int() does not)
_CUDA_DEVICE = re.compile(r"cuda(:[0-9]+)?")


def _at_least(value: float, low: float) -> bool:
    """``value >= low`` and finite (NaN and infinity are refused wherever a number is)."""
    return math.isfinite(value) and value >= low


def _tensors_problem(model: ModelConfig) -> str:
    if not model.inputs or not model.outputs:
        return "at least one input and one output are required"
    for kind, specs in (("input", model.inputs), ("output", model.outputs)):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            return f"{kind} names must be unique, got {names}"
        for spec in specs:
            if not spec.name:
                return f"every {kind} needs a name, got '' ({kind}s {names})"
            try:
                parse_datatype(spec.datatype)
            except ValueError as exc:
                return f"{kind} {spec.name!r}: {exc}"
            if any(d == 0 or d < -1 for d in spec.shape):
                return f"{kind} {spec.name!r}: dims must be positive or -1, got {list(spec.shape)}"
    for field, own in (
        ("model_inputs", model.model_inputs),
        ("model_outputs", model.model_outputs),
    ):
        if any(not name for name in own) or len(set(own)) != len(own):
            return f"{field} must be distinct non-empty tensor names, got {list(own)}"
    return ""


def _batching_problem(model: ModelConfig) -> str:
    batching = model.batching
    if model.max_batch_size < 0:
        return f"max_batch_size must be >= 0 (0: no batch dimension), got {model.max_batch_size}"
    if batching.buckets and model.max_batch_size == 0:
        return (
            f"batching.buckets {list(batching.buckets)} needs max_batch_size > 0 "
            "(a model without a batch dimension has no batch sizes)"
        )
    if any(b < 1 or b > model.max_batch_size for b in batching.buckets):
        return (
            f"batching.buckets must lie in 1..max_batch_size ({model.max_batch_size}), "
            f"got {list(batching.buckets)}"
        )
    if batching.max_queue_delay_us < 0:
        return f"batching.max_queue_delay_us must be >= 0, got {batching.max_queue_delay_us}"
    if batching.max_queue_size < 1:
        return f"batching.max_queue_size must be at least 1, got {batching.max_queue_size}"
    return ""


def _pool_problem(model: ModelConfig) -> str:
    pool = model.pool
    for field, value, low in (
        ("workers", pool.workers, 1),
        ("max_inflight_per_worker", pool.max_inflight_per_worker, 1),
        ("min_warm", pool.min_warm, 0),
        ("max_workers", pool.max_workers, 0),
        ("threads", pool.threads, 0),
        ("shm_slot_bytes", pool.shm_slot_bytes, 0),
    ):
        if value < low:
            zero = " (0: the default)" if low == 0 else ""
            return f"pool.{field} must be at least {low}{zero}, got {value}"
    if pool.min_warm > pool.workers:  # (the pool starts `workers`: readiness would never come)
        return (
            f"pool.min_warm ({pool.min_warm}) must not exceed pool.workers ({pool.workers}), "
            "the workers started"
        )
    if pool.max_workers and pool.max_workers < pool.workers:
        return (
            f"pool.max_workers ({pool.max_workers}) must be 0 (= workers) or at least "
            f"pool.workers ({pool.workers})"
        )
    for field, seconds in (
        ("watchdog_s", pool.watchdog_s),
        ("startup_timeout_s", pool.startup_timeout_s),
    ):
        if not (math.isfinite(seconds) and seconds > 0):
            return f"pool.{field} must be a number of seconds > 0, got {seconds}"
    for field, amount in (
        ("p95_target_ms", pool.p95_target_ms),
        ("scale_up_after_s", pool.scale_up_after_s),
        ("scale_down_after_s", pool.scale_down_after_s),
    ):
        if not _at_least(amount, 0):
            return f"pool.{field} must be >= 0, got {amount}"
    if pool.idle_spin_us != -1 and not 0 <= pool.idle_spin_us <= 1_000_000:
        return (
            "pool.idle_spin_us must be between 0 and 1000000 (one second), or -1 (auto), "
            f"got {pool.idle_spin_us}"
        )
    return ""


def _probe_problem(model: ModelConfig) -> str:
    probe = model.probe
    for field, seconds in (("interval_s", probe.interval_s), ("timeout_s", probe.timeout_s)):
        if not (math.isfinite(seconds) and seconds > 0):
            return f"probe.{field} must be a number of seconds > 0, got {seconds}"
    if probe.failures_to_replace < 1:
        return f"probe.failures_to_replace must be at least 1, got {probe.failures_to_replace}"
    for field, value in (("rtol", probe.rtol), ("atol", probe.atol)):
        if not _at_least(value, 0):
            return f"probe.{field} must be >= 0, got {value}"
    return ""


def model_files(model: ModelConfig) -> dict[str, str]:
    """The files a model's configuration names, by the setting that names them."""
    return {
        "model_file": model.model_file,
        "process": model.process,
        "reference_profile": model.reference_profile,
        "probe.inputs_file": model.probe.inputs_file,
        "probe.expected_file": model.probe.expected_file,
    }
