"""One frozen configuration tree. The only module that reads environment variables.

A model repository is a directory with one folder per model; each folder holds ``model.toml``
(the model's configuration) and the model file it names. Tensor shapes in ``model.toml`` leave
out the batch dimension when ``max_batch_size > 0`` (Triton's convention); -1 marks a variable
dimension.
"""

from __future__ import annotations

import math
import os
import re
import typing
from pathlib import Path
from typing import Literal

import msgspec

from serve.errors import ConfigError, InvalidBundleError
from serve.protocol.datatypes import parse_datatype

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
    device: str = "auto"  # "auto", "cpu" or "cuda:N"
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


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int = 8000  # plain-HTTP health endpoints and /metrics; -1 disables them
    health_port: int = -1  # a separate plaintext gRPC port with only grpc.health.v1; -1: none
    max_message_bytes: int = 64 * 1024 * 1024
    # Bytes of inference requests the serving process holds at once, server-wide, from their
    # decoding to their answer (decoded size: BYTES elements cost several times their wire
    # size); a request that would go over is refused RESOURCE_EXHAUSTED at once. 1 GiB: an
    # eighth of the pod's 8 GiB limit, which also holds the workers, their shared memory and
    # the answers; 16 requests of the largest message size.
    max_inflight_bytes: int = 1 << 30
    grace_period_s: float = 10.0  # in-flight calls get this long to finish on SIGTERM
    drain_delay_s: float = 0.0  # on SIGTERM: NOT_SERVING first, keep serving this long, then stop
    model_control: bool = False  # allow RepositoryModelLoad / Unload (rollouts, rollbacks)
    rollout_watch_s: float = 30.0  # after a switch, a failing new version is rolled back
    keep_previous_s: float = 60.0  # the previous version stays warm this long (instant rollback)
    log_level: str = "INFO"
    # Every model whose device is "auto" must run on CUDA: a worker that would fall back to the
    # CPU (no GPU, no CUDA provider, a broken driver) fails its start. "cpu" models stay on CPU.
    require_gpu: bool = False
    # Processes that terminate gRPC on the port (relays sharing it with SO_REUSEPORT) and pass
    # each call to this process, which batches and serves them all. 1: this process alone.
    frontends: int = 1
    # Each relay's ring, shared memory that large requests' tensors take past the socket: its
    # slots (0: no ring, every call inline) and their size (larger requests go inline).
    relay_ring_slots: int = 64
    relay_ring_slot_kib: int = 1024
    # A relay that has not answered the hub's pings (one a second) for this long hangs (a
    # deadlock, a stopped process): it is killed and started again, since the kernel would go on
    # handing it a share of the new connections.
    relay_hang_s: float = 10.0


class Config(msgspec.Struct, frozen=True):
    server: ServerConfig
    repository: str  # folder of bundles / model folders
    cache_dir: str  # where archives are unpacked (by bundle id)


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
        return f"device must be 'auto', 'cpu' or 'cuda:N' (N = 0, 1, ...), got {model.device!r}"
    if not _at_least(model.latency_budget_ms, 0):
        return f"latency_budget_ms must be >= 0 (0: none), got {model.latency_budget_ms}"
    return ""


_CUDA_DEVICE = re.compile(r"cuda:[0-9]+")  # (ASCII digits: str.isdigit takes "²", int() not)


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
    if list(batching.buckets) != sorted(set(batching.buckets)):
        return f"batching.buckets must be increasing, each size once, got {list(batching.buckets)}"
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


def load_model_dir(directory: Path) -> ModelConfig:
    """Read and validate ``directory/model.toml``."""
    path = directory / MODEL_CONFIG_FILE
    if not directory.is_dir():
        raise InvalidBundleError(
            f"{directory} is not a model folder (a directory with {path.name})"
        )
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidBundleError(f"{path}: missing {MODEL_CONFIG_FILE}") from None
    except OSError as exc:  # (unreadable: a permission, a directory of that name)
        raise InvalidBundleError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        written = msgspec.toml.decode(raw)
        model = msgspec.convert(written, ModelConfig)
    except msgspec.ValidationError as exc:
        raise InvalidBundleError(f"{path}: {explain_validation_error(exc, written)}") from None
    except msgspec.DecodeError as exc:
        raise InvalidBundleError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:  # (TOML is UTF-8; msgspec lets this one through)
        raise InvalidBundleError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        ) from None
    if problem := _written_problem(written):
        raise InvalidBundleError(f"{path}: {problem}")
    model = msgspec.structs.replace(model, directory=str(directory.resolve()))
    validate_model(model)
    return model


_AT = re.compile(r"(?P<what>.*) - at `\$(?P<path>.*)`")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
# the settings a table may hold, by the key that names the table (model.toml or a manifest)
_TABLES: dict[str, type[msgspec.Struct]] = {
    "": ModelConfig,
    "model": ModelConfig,
    "batching": BatchingConfig,
    "pool": PoolConfig,
    "probe": ProbeConfig,
    "inputs": TensorSpec,
    "outputs": TensorSpec,
}


def explain_validation_error(exc: msgspec.ValidationError, written: object) -> str:
    """msgspec's message, said as the user wrote it: the setting and the value written for a
    wrong type ("pool.workers = '2': Expected `int`, got `str`"), the settings the table
    allows for an unknown one (a typo)."""
    found = _AT.fullmatch(str(exc))
    what, path = (found["what"], found["path"]) if found else (str(exc), "")  # ("": the top)
    steps = [(key, int(index) if index else None) for key, index in _STEP.findall(path)]
    field = path.lstrip(".") or "the top level"
    if what.startswith("Object contains unknown field"):
        keys = [key for key, _ in steps if key]
        table = _TABLES.get(keys[-1] if keys else "")
        if table is None:
            return f"{what} in {field}"
        allowed = [f.name for f in msgspec.structs.fields(table) if f.name != "directory"]
        return f"{what} in {field}; allowed: {', '.join(allowed)}"
    if what.startswith("Invalid enum value") and steps and steps[-1][0]:
        keys = [key for key, _ in steps[:-1] if key]
        table = _TABLES.get(keys[-1] if keys else "")
        hint = typing.get_type_hints(table).get(steps[-1][0]) if table else None
        if typing.get_origin(hint) is Literal:
            what += f"; allowed: {', '.join(map(repr, typing.get_args(hint)))}"
    if not steps:  # (a required setting missing at the top: the message says which)
        return what
    value = written
    for key, index in steps:
        if key and isinstance(value, dict) and key in value:
            value = value[key]
        elif index is not None and isinstance(value, list) and index < len(value):
            value = value[index]
        else:
            return f"{field}: {what}"
    shown = repr(value)
    return f"{field} = {shown if len(shown) <= 80 else shown[:77] + '...'}: {what}"


def _written_problem(written: dict[str, object]) -> str:
    """What model.toml says that its decoded form cannot tell from a default: an empty
    ``batching.buckets`` (read as "the default buckets"), a ``directory`` (set by the loader)."""
    batching = written.get("batching")
    if isinstance(batching, dict) and batching.get("buckets") == []:
        return (
            "batching.buckets is empty; list the batch sizes to warm (1..max_batch_size), or "
            "leave it out for powers of two up to max_batch_size"
        )
    if "directory" in written:
        return "directory is set by the loader (the model's folder); remove it"
    return ""


# where each server setting comes from: its environment variable and its `warmserve serve` flag
SERVER_ENV = {
    "host": "WARMSERVE_HOST",
    "grpc_port": "WARMSERVE_GRPC_PORT",
    "http_port": "WARMSERVE_HTTP_PORT",
    "health_port": "WARMSERVE_HEALTH_PORT",
    "drain_delay_s": "WARMSERVE_DRAIN_DELAY_S",
    "model_control": "WARMSERVE_MODEL_CONTROL",
    "rollout_watch_s": "WARMSERVE_ROLLOUT_WATCH_S",
    "keep_previous_s": "WARMSERVE_KEEP_PREVIOUS_S",
    "max_message_bytes": "WARMSERVE_MAX_MESSAGE_BYTES",
    "max_inflight_bytes": "WARMSERVE_MAX_INFLIGHT_BYTES",
    "grace_period_s": "WARMSERVE_GRACE_PERIOD_S",
    "log_level": "WARMSERVE_LOG_LEVEL",
    "require_gpu": "WARMSERVE_REQUIRE_GPU",
    "frontends": "WARMSERVE_FRONTENDS",
    "relay_ring_slots": "WARMSERVE_RELAY_RING_SLOTS",
    "relay_ring_slot_kib": "WARMSERVE_RELAY_RING_SLOT_KIB",
    "relay_hang_s": "WARMSERVE_RELAY_HANG_S",
}
SERVER_FLAGS = {
    "host": "--host",
    "grpc_port": "--grpc-port",
    "http_port": "--http-port",
    "health_port": "--health-port",
    "drain_delay_s": "--drain-delay",
    "model_control": "--model-control",
    "max_message_bytes": "--max-message-bytes",
    "max_inflight_bytes": "--max-inflight-bytes",
    "grace_period_s": "--grace-period",
    "log_level": "--log-level",
    "require_gpu": "--require-gpu",
    "frontends": "--frontends",
}
MAX_PORT = 65535
MAX_FRONTENDS = 64  # relay processes; past a few the serving process's loop is the limit
MAX_MESSAGE_BYTES = (1 << 31) - 1  # gRPC takes its message limits as C ints
MAX_RING_KIB = 64 << 20  # a relay's ring (64 slots of 1 MiB by default): 64 GiB at most
_WORDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false (or 1 or 0)",
    str: "a string",
}


def server_config_from_env(**overrides: object) -> ServerConfig:
    """ServerConfig from WARMSERVE_* environment variables, then explicit (non-None) overrides."""
    defaults = ServerConfig()
    values: dict[str, object] = {}
    for field, var in SERVER_ENV.items():
        if var in os.environ:
            kind = type(getattr(defaults, field))
            try:
                values[field] = msgspec.convert(os.environ[var], kind, strict=False)
            except msgspec.ValidationError:
                raise ConfigError(
                    f"{var} must be {_WORDS[kind]}, got {os.environ[var]!r}"
                ) from None
    _check_switches()
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        server = msgspec.convert(values, ServerConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"server configuration: {exc}") from None
    validate_server(server)
    return server


def _setting(field: str) -> str:
    """A server setting as the user meets it: 'grpc_port (--grpc-port, WARMSERVE_GRPC_PORT)'."""
    names = [name for name in (SERVER_FLAGS.get(field), SERVER_ENV.get(field)) if name]
    return f"{field} ({', '.join(names)})"


def validate_server(server: ServerConfig) -> None:
    """Raise ConfigError for settings that cannot work."""
    if not 1 <= server.frontends <= MAX_FRONTENDS:
        raise ConfigError(
            f"{_setting('frontends')} must be between 1 and {MAX_FRONTENDS}, got {server.frontends}"
        )
    if not 0 < server.max_message_bytes <= MAX_MESSAGE_BYTES:
        # (gRPC takes -1 as no limit, 0 refuses every call, over 2 GiB - 1 it cannot start)
        raise ConfigError(
            f"{_setting('max_message_bytes')} must be > 0 and at most {MAX_MESSAGE_BYTES} "
            f"(2 GiB - 1), got {server.max_message_bytes}"
        )
    if server.max_inflight_bytes <= 0:  # (0 would refuse every request; no "no limit" value)
        raise ConfigError(
            f"{_setting('max_inflight_bytes')} must be > 0, got {server.max_inflight_bytes}"
        )
    if server.log_level.upper() not in LOG_LEVELS:  # (logging would refuse it with a traceback)
        raise ConfigError(
            f"{_setting('log_level')} must be one of {', '.join(LOG_LEVELS)}"
            f" (any case), got {server.log_level!r}"
        )
    if not server.host or server.host.strip() != server.host:
        raise ConfigError(
            f"{_setting('host')} must be an address to listen on (0.0.0.0: every IPv4 address, "
            f"'::': every address), got {server.host!r}"
        )
    _validate_ports(server)
    _validate_durations(server)
    if server.relay_ring_slots < 0:
        raise ConfigError(
            f"relay_ring_slots (WARMSERVE_RELAY_RING_SLOTS) must be >= 0 (0: no ring), "
            f"got {server.relay_ring_slots}"
        )
    if server.relay_ring_slot_kib < 1:
        raise ConfigError(
            f"relay_ring_slot_kib (WARMSERVE_RELAY_RING_SLOT_KIB) must be >= 1, "
            f"got {server.relay_ring_slot_kib}"
        )
    ring_kib = server.relay_ring_slots * server.relay_ring_slot_kib
    if ring_kib > MAX_RING_KIB:  # (mapped whole when a relay starts: past the address space,
        # ENOMEM failed every start of a relay, and the server never turned ready)
        raise ConfigError(
            f"a relay's ring, WARMSERVE_RELAY_RING_SLOTS ({server.relay_ring_slots}) x "
            f"WARMSERVE_RELAY_RING_SLOT_KIB ({server.relay_ring_slot_kib}) = {ring_kib} KiB, "
            f"must be at most {MAX_RING_KIB} KiB (64 GiB)"
        )


def _validate_ports(server: ServerConfig) -> None:
    # a port out of range was taken modulo 65536 (-5 listened on 65531, 70000 on 4464)
    if not 0 <= server.grpc_port <= MAX_PORT:
        raise ConfigError(
            f"{_setting('grpc_port')} must be between 0 (any free port) and {MAX_PORT}, "
            f"got {server.grpc_port}"
        )
    for field in ("http_port", "health_port"):
        port = getattr(server, field)
        if port != -1 and not 0 <= port <= MAX_PORT:
            raise ConfigError(
                f"{_setting(field)} must be -1 (off), 0 (any free port) or up to {MAX_PORT}, "
                f"got {port}"
            )
    ports = {field: getattr(server, field) for field in ("grpc_port", "http_port", "health_port")}
    fixed = [(_setting(name), port) for name, port in ports.items() if port > 0]  # (0: any)
    for i, (name, port) in enumerate(fixed):
        for other, other_port in fixed[i + 1 :]:
            if port == other_port:  # (gRPC's listeners take SO_REUSEPORT: they would share it)
                raise ConfigError(f"{name} and {other} are both {port}: give each its own port")


def _validate_durations(server: ServerConfig) -> None:
    for field in ("grace_period_s", "drain_delay_s", "rollout_watch_s", "keep_previous_s"):
        seconds = getattr(server, field)
        if not (math.isfinite(seconds) and seconds >= 0):  # (NaN, infinity: a stop never ends)
            raise ConfigError(f"{_setting(field)} must be a number of seconds >= 0, got {seconds}")
    if not (math.isfinite(server.relay_hang_s) and server.relay_hang_s >= 1.0):
        # (pings go once a second; NaN and infinity would never catch a hung relay)
        raise ConfigError(
            f"relay_hang_s (WARMSERVE_RELAY_HANG_S) must be >= 1, got {server.relay_hang_s}"
        )


# on/off switches read where they act (workers too): checked once at start, in
# server_config_from_env, since a worker has no one to tell (WARMSERVE_LOOP_SPIN is read by
# serve/pool/loop_spin.py, which takes 1, true and yes as on)
SWITCH_ENV = ("WARMSERVE_MALLOC_TUNING", "WARMSERVE_PAGE_LOCK", "WARMSERVE_LOOP_SPIN")
SWITCH_ON = ("1", "true", "yes")
SWITCH_OFF = ("0", "false", "no")


def _switch_on(var: str) -> bool:
    """A switch that is on unless its variable says off (any case)."""
    return os.environ.get(var, "").strip().lower() not in SWITCH_OFF


def _check_switches() -> None:
    for var in SWITCH_ENV:
        value = os.environ.get(var)
        if value is not None and value.strip().lower() not in (*SWITCH_ON, *SWITCH_OFF, ""):
            raise ConfigError(f"{var} must be 1 or 0 (or true / false, yes / no), got {value!r}")


def malloc_tuning_from_env() -> bool:
    """WARMSERVE_MALLOC_TUNING=0 keeps glibc's allocation thresholds (serve/memory.py)."""
    return _switch_on("WARMSERVE_MALLOC_TUNING")


def page_lock_from_env() -> bool:
    """WARMSERVE_PAGE_LOCK=0: the torch backend stages copies to the GPU instead of
    page-locking the shared memory (to compare the two on one machine)."""
    return _switch_on("WARMSERVE_PAGE_LOCK")


def default_repository_from_env() -> str:
    """WARMSERVE_REPOSITORY, "" when unset (the demo models). Set but empty is refused: an
    unset shell variable (WARMSERVE_REPOSITORY=$MODELS) would serve the demo models instead."""
    value = os.environ.get("WARMSERVE_REPOSITORY")
    if value is not None and not value.strip():
        raise ConfigError(
            f"WARMSERVE_REPOSITORY is set but empty ({value!r}): name the model repository "
            "folder, or unset it to serve the demo models"
        )
    return value or ""


def cache_dir_from_env() -> Path:
    """Where generated artefacts (the demo repository) live: WARMSERVE_CACHE_DIR or ~/.cache."""
    base = os.environ.get("WARMSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "warmserve"
    )
    return Path(base)
