"""The server's configuration, from its flags and WARMSERVE_* environment variables, and the
switches read where they act. The only module that reads environment variables."""

from __future__ import annotations

import math
import os
from pathlib import Path

import msgspec

from serve.config.model import LOG_LEVELS
from serve.errors import ConfigError


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
    # A relay whose anonymous memory passes this many MiB is recycled (0: never): it finishes
    # its calls and another takes its place, one relay at a time and only while another
    # listens. grpcio keeps a few hundred bytes of every call its client cancels or lets
    # expire (grpc/grpc#43360), which only a new process gives back; a relay starts at ~30 MiB.
    relay_max_memory_mib: int = 512
    # gRPC sends each connection to the public port (this process's, or each relay's) a GOAWAY
    # after this long (0: never; gRPC adds up to 10 % either way); its client takes its next
    # calls to a new connection, which a Service or the kernel may give another pod or relay.
    # Clients spread again over pods the HPA adds and over the relays; a relay being recycled,
    # and the whole server on SIGTERM after its drain delay, first stop listening, then wait
    # (bounded) for their busy clients to go this way, so that gRPC's stop finds no call to
    # cancel (calls still on an old connection finish there). (0: a plain graceful stop.)
    # 8 s: every client reaches it (+ 10 %) within the default grace period's wait, so a stop
    # with the defaults cancels no call; a reconnect every 8 s costs a client next to nothing.
    max_connection_age_s: float = 8.0


class Config(msgspec.Struct, frozen=True):
    server: ServerConfig
    repository: str  # folder of bundles / model folders
    cache_dir: str  # where archives are unpacked (by bundle id)


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
    "relay_max_memory_mib": "WARMSERVE_RELAY_MAX_MEMORY_MIB",
    "max_connection_age_s": "WARMSERVE_MAX_CONNECTION_AGE_S",
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
    "max_connection_age_s": "--max-connection-age",
}
MAX_PORT = 65535
MAX_FRONTENDS = 64  # relay processes; past a few the serving process's loop is the limit
MAX_MESSAGE_BYTES = (1 << 31) - 1  # gRPC takes its message limits as C ints
MAX_RING_KIB = 64 << 20  # a relay's ring (64 slots of 1 MiB by default): 64 GiB at most
_WORDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
}


def server_config_from_env(**overrides: object) -> ServerConfig:
    """ServerConfig from WARMSERVE_* environment variables, then explicit (non-None) overrides."""
    defaults = ServerConfig()
    values: dict[str, object] = {}
    for field, var in SERVER_ENV.items():
        if var in os.environ:
            kind = type(getattr(defaults, field))
            if kind is bool:  # the words the switches take, too
                values[field] = _yes_or_no(var, os.environ[var])
                continue
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
    if server.relay_max_memory_mib < 0:
        raise ConfigError(
            "relay_max_memory_mib (WARMSERVE_RELAY_MAX_MEMORY_MIB) must be >= 0 (0: relays are "
            f"never recycled), got {server.relay_max_memory_mib}"
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
    age = server.max_connection_age_s
    if not (math.isfinite(age) and (age == 0 or age >= 1.0)):
        # (under a second, clients would spend their time reconnecting)
        raise ConfigError(
            "max_connection_age_s (WARMSERVE_MAX_CONNECTION_AGE_S) must be 0 (never) "
            f"or a number of seconds >= 1, got {age}"
        )
    if not (math.isfinite(server.relay_hang_s) and server.relay_hang_s >= 1.0):
        # (pings go once a second; NaN and infinity would never catch a hung relay)
        raise ConfigError(
            f"relay_hang_s (WARMSERVE_RELAY_HANG_S) must be >= 1, got {server.relay_hang_s}"
        )


# on/off switches read where they act (workers too): checked once at start, in
# server_config_from_env, since a worker has no one to tell
SWITCH_ENV = (
    "WARMSERVE_MALLOC_TUNING",
    "WARMSERVE_PAGE_LOCK",
    "WARMSERVE_LOOP_SPIN",
    "WARMSERVE_GC_FREEZE",
)
SWITCH_ON = ("1", "true", "yes")
SWITCH_OFF = ("0", "false", "no")


def _yes_or_no(var: str, value: str) -> bool:
    word = value.strip().lower()
    if word not in (*SWITCH_ON, *SWITCH_OFF):
        raise ConfigError(f"{var} must be 1 or 0 (or true / false, yes / no), got {value!r}")
    return word in SWITCH_ON


def _switch_on(var: str) -> bool:
    """A switch that is on unless its variable says off (any case)."""
    return os.environ.get(var, "").strip().lower() not in SWITCH_OFF


def _check_switches() -> None:
    for var in SWITCH_ENV:
        value = os.environ.get(var)
        if value is not None and value.strip():  # (set but empty: the default)
            _yes_or_no(var, value)


def malloc_tuning_from_env() -> bool:
    """WARMSERVE_MALLOC_TUNING=0 keeps glibc's allocation thresholds (serve/memory.py)."""
    return _switch_on("WARMSERVE_MALLOC_TUNING")


def gc_freeze_from_env() -> bool:
    """WARMSERVE_GC_FREEZE=0: the long-lived objects of start-up stay in the collector's full
    passes (serve/memory.py: freeze_long_lived)."""
    return _switch_on("WARMSERVE_GC_FREEZE")


def loop_spin_from_env() -> bool:
    """WARMSERVE_LOOP_SPIN=1: the serving loop polls while a batch or two are out (an
    experiment, off by default: serve/pool/loop_spin.py)."""
    return os.environ.get("WARMSERVE_LOOP_SPIN", "").strip().lower() in SWITCH_ON


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
