from pathlib import Path

import pytest

from serve.bundles.cache import BundleCache
from serve.bundles.repository import scan
from serve.config import ServerConfig, load_model_dir, server_config_from_env
from serve.errors import ConfigError, InvalidBundleError
from serve.testing.models import write_config

BASE = {
    "name": "m",
    "backend": "onnx",
    "model_file": "model.onnx",
    "max_batch_size": 12,
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [4]}],
    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [1]}],
}


def _repo(tmp_path: Path, **changes) -> Path:
    """A repository with model "m" of BASE with ``changes`` (a None leaves the key out)."""
    config = {key: value for key, value in {**BASE, **changes}.items() if value is not None}
    folder = write_config(tmp_path / "m", config)
    (folder / "model.onnx").write_bytes(b"")
    return tmp_path


def test_a_valid_folder_loads_with_power_of_two_buckets_up_to_the_max(tmp_path):
    model = load_model_dir(_repo(tmp_path) / "m")
    assert model.name == "m" and model.directory == str((tmp_path / "m").resolve())
    assert model.batch_buckets == (1, 2, 4, 8, 12)
    assert model.pool.workers == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_batch_size": "8"}, r"max_batch_size = '8': Expected `int`, got `str`"),
        ({"backend": "tensorflow"}, "backend"),
        (
            {"inputs": [{"name": "X", "datatype": "FLOAT", "shape": [4]}]},
            "input 'X': unknown datatype",
        ),
        (
            {"inputs": [{"name": "X", "datatype": "FP32", "shape": [0]}]},
            "dims must be positive or -1",
        ),
        ({"model_file": "missing.onnx"}, "model_file 'missing.onnx' does not exist"),
        ({"surprise": 1}, "unknown field `surprise`"),
        ({"device": "gpu"}, "device must be"),
        ({"pool": {"idle_spin_us": -2}}, "pool.idle_spin_us must be between 0 and 1000000"),
        ({"pool": {"idle_spin_us": 2e6}}, "pool.idle_spin_us must be between 0 and 1000000"),
    ],
)
def test_invalid_configs_are_refused_naming_the_problem(tmp_path, changes, message):
    with pytest.raises(InvalidBundleError, match=message):
        load_model_dir(_repo(tmp_path, **changes) / "m")


NAN = float("nan")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # each names the field, the value and what is allowed
        ({"pool": {"workers": 0}}, r"pool.workers must be at least 1, got 0"),
        ({"pool": {"max_inflight_per_worker": 0}}, r"max_inflight_per_worker must be at least 1"),
        ({"pool": {"min_warm": -1}}, r"pool.min_warm must be at least 0 .*, got -1"),
        # a pool that starts 2 workers and waits for 3 would never be ready
        ({"pool": {"workers": 2, "min_warm": 3}}, r"min_warm \(3\) must not exceed .*\(2\)"),
        # a ceiling under the floor was silently taken as `workers`
        ({"pool": {"workers": 3, "max_workers": 2}}, r"max_workers \(2\) must be 0 .* \(3\)"),
        ({"pool": {"max_workers": -1}}, r"pool.max_workers must be at least 0 .*, got -1"),
        ({"pool": {"threads": -1}}, r"pool.threads must be at least 0 .*, got -1"),
        ({"pool": {"shm_slot_bytes": -1}}, r"pool.shm_slot_bytes must be at least 0 .*, got -1"),
        ({"pool": {"watchdog_s": 0}}, r"pool.watchdog_s must be a number of seconds > 0, got 0"),
        ({"pool": {"watchdog_s": NAN}}, r"pool.watchdog_s must be .* > 0, got nan"),
        ({"pool": {"startup_timeout_s": 0}}, r"pool.startup_timeout_s must be .* > 0, got 0"),
        ({"pool": {"startup_timeout_s": -5}}, r"pool.startup_timeout_s must be .* > 0, got -5"),
        ({"pool": {"p95_target_ms": -1}}, r"pool.p95_target_ms must be >= 0, got -1"),
        ({"pool": {"scale_up_after_s": -1}}, r"pool.scale_up_after_s must be >= 0, got -1"),
        ({"probe": {"interval_s": 0}}, r"probe.interval_s must be .* > 0, got 0"),
        ({"probe": {"timeout_s": 0}}, r"probe.timeout_s must be .* > 0, got 0"),
        ({"probe": {"timeout_s": -1}}, r"probe.timeout_s must be .* > 0, got -1"),
        ({"probe": {"failures_to_replace": 0}}, r"failures_to_replace must be at least 1, got 0"),
        ({"probe": {"rtol": -1}}, r"probe.rtol must be >= 0, got -1"),
        ({"probe": {"atol": NAN}}, r"probe.atol must be >= 0, got nan"),
        ({"latency_budget_ms": -1}, r"latency_budget_ms must be >= 0 \(0: none\), got -1"),
        ({"max_batch_size": -1}, r"max_batch_size must be >= 0 .*, got -1"),
        ({"batching": {"max_queue_delay_us": -1}}, r"max_queue_delay_us must be >= 0, got -1"),
        ({"batching": {"max_queue_size": 0}}, r"max_queue_size must be at least 1, got 0"),
        ({"batching": {"buckets": [0, 4]}}, r"buckets must lie in 1..max_batch_size \(12\)"),
        ({"batching": {"buckets": [1, 16]}}, r"buckets must lie in .*, got \[1, 16\]"),
        ({"max_batch_size": 0, "batching": {"buckets": [1]}}, r"needs max_batch_size > 0"),
        ({"inputs": [{"name": "", "datatype": "FP32", "shape": [4]}]}, r"every input needs a name"),
        ({"outputs": [{"name": "", "datatype": "FP32", "shape": [1]}]}, r"every output needs"),
        ({"model_file": ""}, r"model_file must name the model file, got ''"),
        ({"version": ""}, r"version must be non-empty.*got ''"),
        ({"version": "1/2"}, r"version must be .* without '/'.*got '1/2'"),
        # str.isdigit() takes these, the worker's int() does not: it failed every start
        ({"model_inputs": ["a", ""]}, r"model_inputs must be distinct non-empty .*\['a', ''\]"),
        ({"model_outputs": ["y", "y"]}, r"model_outputs must be distinct .*\['y', 'y'\]"),
        ({"device": "cuda:\u00b2"}, r"device must be 'auto', 'cpu', 'cuda' .* or 'cuda:N'"),
        ({"device": "cuda:\uff10"}, r"device must be 'auto', 'cpu', 'cuda' .* or 'cuda:N'"),
        ({"device": "cuda:"}, r"device must be 'auto', 'cpu', 'cuda' .* or 'cuda:N'"),
        ({"device": "gpu"}, r"device must be .*got 'gpu'"),
    ],
)
def test_values_that_cannot_work_are_refused_naming_field_value_and_range(
    tmp_path, changes, message
):
    with pytest.raises(InvalidBundleError, match=message):
        load_model_dir(_repo(tmp_path, **changes) / "m")


@pytest.mark.parametrize(
    "changes",
    [
        {"pool": {"workers": 2, "min_warm": 1, "max_workers": 4, "threads": 0}},
        {"pool": {"workers": 2, "max_workers": 2, "p95_target_ms": 0, "scale_up_after_s": 0}},
        {"batching": {"buckets": [1, 4, 12]}},
        # (taken sorted, each once, as before: bundles built with these must not be refused by
        # a newer server)
        {"batching": {"buckets": [4, 2, 1]}},
        {"batching": {"buckets": [1, 8, 8]}},
        {"device": "cuda:1", "version": "2.0-rc1", "latency_budget_ms": 50.0},
        {"device": "cuda"},  # (as torch writes it: the first GPU)
        {"probe": {"rtol": 0, "atol": 0, "failures_to_replace": 1}},
    ],
)
def test_edge_values_that_work_are_taken(tmp_path, changes):
    load_model_dir(_repo(tmp_path, **changes) / "m")


def test_two_folders_with_one_model_name_and_version_are_refused(tmp_path):
    _repo(tmp_path)
    other = write_config(tmp_path / "other", BASE)
    (other / "model.onnx").write_bytes(b"")
    sources, refused = scan(tmp_path, BundleCache(tmp_path / "cache"))
    assert len(sources) == 1
    assert refused == [f"{tmp_path / 'other'}: m version 1 appears twice"]


def test_server_config_takes_env_then_flags(monkeypatch):
    monkeypatch.setenv("WARMSERVE_GRPC_PORT", "9000")
    monkeypatch.setenv("WARMSERVE_HOST", "127.0.0.1")
    config = server_config_from_env(grpc_port=9100, host=None)
    assert (config.host, config.grpc_port) == ("127.0.0.1", 9100)
    assert config.max_message_bytes >= 64 * 1024 * 1024
    monkeypatch.setenv("WARMSERVE_GRPC_PORT", "eighty")
    with pytest.raises(ConfigError, match="WARMSERVE_GRPC_PORT must be an integer, got 'eighty'"):
        server_config_from_env()


@pytest.mark.parametrize("value", [0, -1, 65, 10_000])
def test_frontends_must_be_at_least_one_and_not_huge(value):
    # (10000 relay processes were started without a word)
    with pytest.raises(ConfigError, match=rf"frontends .* must be between 1 and 64, got {value}"):
        server_config_from_env(frontends=value)


def test_frontends_come_from_env(monkeypatch):
    monkeypatch.setenv("WARMSERVE_FRONTENDS", "4")
    assert server_config_from_env().frontends == 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("0", False), ("true", True), ("yes", True), (" No ", False), ("FALSE", False)],
)
def test_require_gpu_comes_from_env(monkeypatch, value, expected):
    monkeypatch.setenv("WARMSERVE_REQUIRE_GPU", value)
    assert server_config_from_env().require_gpu is expected


def test_require_gpu_is_off_by_default_and_a_flag_wins_over_env(monkeypatch):
    monkeypatch.delenv("WARMSERVE_REQUIRE_GPU", raising=False)
    assert server_config_from_env().require_gpu is False
    monkeypatch.setenv("WARMSERVE_REQUIRE_GPU", "0")
    assert server_config_from_env(require_gpu=True).require_gpu is True


def test_a_require_gpu_that_is_not_a_bool_is_refused(monkeypatch):
    monkeypatch.setenv("WARMSERVE_REQUIRE_GPU", "sometimes")
    with pytest.raises(ConfigError, match=r"WARMSERVE_REQUIRE_GPU must be 1 or 0 .*'sometimes'"):
        server_config_from_env()


def test_the_require_gpu_flag_reaches_the_server_config(monkeypatch):
    from serve import cli

    monkeypatch.setenv("WARMSERVE_REQUIRE_GPU", "0")
    seen: list[bool] = []

    def stop_at_the_config(**values):
        seen.append(values["require_gpu"])
        raise ConfigError("stop here")

    monkeypatch.setattr(cli, "server_config_from_env", stop_at_the_config)
    assert cli.main(["serve", "--require-gpu"]) == 2
    assert cli.main(["serve"]) == 2
    assert seen == [True, None]  # None: the environment decides


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ({"grpc_port": 9000, "http_port": 9000}, "grpc_port .* and http_port .* are both 9000"),
        ({"http_port": 9100, "health_port": 9100}, "http_port .* and health_port .* both 9100"),
        ({"grpc_port": 8001, "health_port": 8001}, "grpc_port .* and health_port .* both 8001"),
    ],
)
def test_two_listeners_on_one_port_are_refused(ports, message):
    # gRPC takes SO_REUSEPORT: it would share the port with the other listener, and the kernel
    # would hand health probes to the gRPC server now and then
    with pytest.raises(ConfigError, match=message):
        server_config_from_env(**ports)


def test_ports_of_any_and_none_may_repeat():
    config = server_config_from_env(grpc_port=0, http_port=0, health_port=-1)
    assert (config.grpc_port, config.http_port, config.health_port) == (0, 0, -1)


@pytest.mark.parametrize("value", ["0.5", "-1", "nan"])
def test_a_relay_hang_time_under_a_second_is_refused(monkeypatch, value):
    monkeypatch.setenv("WARMSERVE_RELAY_HANG_S", value)
    with pytest.raises(ConfigError, match=r"relay_hang_s \(WARMSERVE_RELAY_HANG_S\) must be >= 1"):
        server_config_from_env()


def test_the_relay_hang_time_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("WARMSERVE_RELAY_HANG_S", "30")
    assert server_config_from_env().relay_hang_s == 30.0


def test_the_relay_memory_limit_comes_from_the_environment_and_is_not_negative(monkeypatch):
    assert server_config_from_env().relay_max_memory_mib == 512
    monkeypatch.setenv("WARMSERVE_RELAY_MAX_MEMORY_MIB", "0")  # never recycled
    assert server_config_from_env().relay_max_memory_mib == 0
    monkeypatch.setenv("WARMSERVE_RELAY_MAX_MEMORY_MIB", "-1")
    with pytest.raises(ConfigError, match=r"WARMSERVE_RELAY_MAX_MEMORY_MIB\) must be >= 0"):
        server_config_from_env()
    monkeypatch.setenv("WARMSERVE_RELAY_MAX_MEMORY_MIB", "1.5")
    with pytest.raises(ConfigError, match="WARMSERVE_RELAY_MAX_MEMORY_MIB"):
        server_config_from_env()


def test_the_relay_connection_age_comes_from_the_environment(monkeypatch):
    assert server_config_from_env().max_connection_age_s == 8.0
    monkeypatch.setenv("WARMSERVE_MAX_CONNECTION_AGE_S", "0")  # never
    assert server_config_from_env().max_connection_age_s == 0
    monkeypatch.setenv("WARMSERVE_MAX_CONNECTION_AGE_S", "2.5")
    assert server_config_from_env().max_connection_age_s == 2.5


@pytest.mark.parametrize("age", ["0.5", "-1", "nan", "inf"])
def test_a_relay_connection_age_under_a_second_or_not_finite_is_refused(monkeypatch, age):
    monkeypatch.setenv("WARMSERVE_MAX_CONNECTION_AGE_S", age)
    with pytest.raises(ConfigError, match=r"must be 0 \(never\) or a number of seconds >= 1"):
        server_config_from_env()


@pytest.mark.parametrize("level", ["verbose", "TRACE", ""])
def test_an_unknown_log_level_is_refused_naming_the_levels(level):
    with pytest.raises(ConfigError, match=r"log_level .* one of DEBUG, INFO, WARNING, ERROR"):
        server_config_from_env(log_level=level)


def test_an_unknown_log_level_is_a_clear_error_from_the_command_line(capsys, tmp_path):
    from serve import cli

    missing = str(tmp_path / "missing")  # (without the check, the start ends there instead)
    assert cli.main(["serve", "--log-level", "verbose", "--repository", missing]) == 2
    assert "WARMSERVE_LOG_LEVEL) must be one of" in capsys.readouterr().err


def test_a_log_level_in_any_case_is_taken(monkeypatch):
    monkeypatch.setenv("WARMSERVE_LOG_LEVEL", "debug")
    assert server_config_from_env().log_level == "debug"


@pytest.mark.parametrize("value", [0, -1])
def test_a_max_message_size_that_is_not_positive_is_refused(value):
    """gRPC reads -1 as no limit at all (a request of any size is read into memory), and 0
    refuses every request."""
    with pytest.raises(ConfigError, match=r"max_message_bytes .* must be > 0"):
        server_config_from_env(max_message_bytes=value)


def test_the_inflight_request_budget_comes_from_env_and_the_flag_wins(monkeypatch):
    assert server_config_from_env().max_inflight_bytes == 1 << 30
    monkeypatch.setenv("WARMSERVE_MAX_INFLIGHT_BYTES", "5000000")
    assert server_config_from_env().max_inflight_bytes == 5_000_000
    assert server_config_from_env(max_inflight_bytes=7).max_inflight_bytes == 7


@pytest.mark.parametrize("value", [0, -1])
def test_an_inflight_request_budget_that_is_not_positive_is_refused(value):
    """0 would refuse every request while the server reports ready; there is no 'no limit'."""
    with pytest.raises(ConfigError, match=r"max_inflight_bytes .* must be > 0"):
        server_config_from_env(max_inflight_bytes=value)


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False), ("yes", True)])
def test_the_workers_experiment_switches_are_read_here(monkeypatch, value, on):
    from serve.config import malloc_tuning_from_env, page_lock_from_env

    for name in ("WARMSERVE_MALLOC_TUNING", "WARMSERVE_PAGE_LOCK"):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert malloc_tuning_from_env() is on and page_lock_from_env() is on


def test_an_empty_bucket_list_is_refused_not_read_as_the_default(tmp_path):
    # `buckets = []` decoded to the default (), and the model warmed powers of two instead
    with pytest.raises(InvalidBundleError, match=r"batching.buckets is empty; list the batch"):
        load_model_dir(_repo(tmp_path, batching={"buckets": []}) / "m")


def test_a_directory_in_model_toml_is_refused_not_silently_replaced(tmp_path):
    with pytest.raises(InvalidBundleError, match=r"directory is set by the loader"):
        load_model_dir(_repo(tmp_path, directory="/elsewhere") / "m")


def test_a_model_folder_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidBundleError, match=r"file is not a model folder"):
        load_model_dir(tmp_path / "file")


def test_an_unreadable_model_toml_is_refused_and_the_scan_goes_on(tmp_path, monkeypatch):
    _repo(tmp_path)
    other = write_config(tmp_path / "other", {**BASE, "name": "other"})
    (other / "model.onnx").write_bytes(b"")
    read_bytes = Path.read_bytes

    def denied(path: Path) -> bytes:
        if path == other / "model.toml":  # (tests run as root: chmod 000 would not stop them)
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    sources, refused = scan(tmp_path, BundleCache(tmp_path / "cache"))
    assert [s.model.name for s in sources] == ["m"]
    assert refused == [f"{other / 'model.toml'}: cannot read it: Permission denied"]


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        # out of range, gRPC took them modulo 65536: -5 listened on 65531, 70000 on 4464
        ({"grpc_port": -5}, r"grpc_port \(--grpc-port, .*\) must be between 0 .* 65535, got -5"),
        ({"grpc_port": 70000}, r"grpc_port .* must be between 0 .* and 65535, got 70000"),
        ({"grpc_port": -1}, r"grpc_port .* must be between 0 .* and 65535, got -1"),
        ({"http_port": -2}, r"http_port .* must be -1 \(off\), 0 .* or up to 65535, got -2"),
        ({"http_port": 65536}, r"http_port .* must be -1 \(off\), .*, got 65536"),
        ({"health_port": 99999}, r"health_port .* must be -1 \(off\), .*, got 99999"),
    ],
)
def test_a_port_out_of_range_is_refused(ports, message):
    with pytest.raises(ConfigError, match=message):
        server_config_from_env(**ports)


@pytest.mark.parametrize("field", ["grace_period_s", "drain_delay_s", "rollout_watch_s"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_negative_or_endless_duration_is_refused(field, value):
    with pytest.raises(ConfigError, match=rf"{field} .* must be a number of seconds >= 0"):
        server_config_from_env(**{field: value})


def test_a_negative_grace_period_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("WARMSERVE_GRACE_PERIOD_S", "-3")
    expected = r"grace_period_s \(--grace-period, WARMSERVE_GRACE_PERIOD_S\) must be .*, got -3"
    with pytest.raises(ConfigError, match=expected):
        server_config_from_env()


def test_zero_durations_are_taken():
    config = server_config_from_env(grace_period_s=0, drain_delay_s=0, keep_previous_s=0)
    assert (config.grace_period_s, config.drain_delay_s, config.keep_previous_s) == (0, 0, 0)


def test_an_endless_relay_hang_time_is_refused(monkeypatch):
    monkeypatch.setenv("WARMSERVE_RELAY_HANG_S", "inf")  # (a hung relay would never be caught)
    with pytest.raises(ConfigError, match=r"relay_hang_s \(WARMSERVE_RELAY_HANG_S\) must be >= 1"):
        server_config_from_env()


def test_a_message_limit_gRPC_cannot_take_is_refused():
    # over 2 GiB - 1 the server's start ended in an OverflowError traceback from gRPC
    with pytest.raises(ConfigError, match=r"max_message_bytes .* at most 2147483647"):
        server_config_from_env(max_message_bytes=1 << 40)
    assert server_config_from_env(max_message_bytes=(1 << 31) - 1).max_message_bytes == 2**31 - 1


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("WARMSERVE_HTTP_PORT", "80O0", r"WARMSERVE_HTTP_PORT must be an integer, got '80O0'"),
        ("WARMSERVE_FRONTENDS", "two", r"WARMSERVE_FRONTENDS must be an integer, got 'two'"),
        ("WARMSERVE_DRAIN_DELAY_S", "5s", r"WARMSERVE_DRAIN_DELAY_S must be a number, got '5s'"),
        (
            "WARMSERVE_MODEL_CONTROL",
            "on",
            r"WARMSERVE_MODEL_CONTROL must be 1 or 0 \(or true / false, yes / no\), got 'on'",
        ),
    ],
)
def test_a_value_of_the_wrong_type_in_the_environment_names_the_variable(
    monkeypatch, variable, value, message
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        server_config_from_env()


@pytest.mark.parametrize("host", ["", " 127.0.0.1"])
def test_an_empty_listen_address_is_refused(monkeypatch, host):
    # (gRPC then failed to bind ':8001', naming neither the setting nor what to write)
    monkeypatch.setenv("WARMSERVE_HOST", host)
    with pytest.raises(ConfigError, match=r"host \(--host, WARMSERVE_HOST\) must be an address"):
        server_config_from_env()


@pytest.mark.parametrize(
    "variable", ["WARMSERVE_MALLOC_TUNING", "WARMSERVE_PAGE_LOCK", "WARMSERVE_GC_FREEZE"]
)
@pytest.mark.parametrize("value", ["false", "no", "FALSE", "0 "])
def test_a_switch_written_as_false_turns_it_off(monkeypatch, variable, value):
    # only "0" did: "false" left glibc tuning and page-locking on without a word
    from serve.config import gc_freeze_from_env, malloc_tuning_from_env, page_lock_from_env

    monkeypatch.setenv(variable, value)
    read = {
        "WARMSERVE_MALLOC_TUNING": malloc_tuning_from_env,
        "WARMSERVE_PAGE_LOCK": page_lock_from_env,
        "WARMSERVE_GC_FREEZE": gc_freeze_from_env,
    }
    assert read[variable]() is False


@pytest.mark.parametrize(
    "variable",
    [
        "WARMSERVE_MALLOC_TUNING",
        "WARMSERVE_PAGE_LOCK",
        "WARMSERVE_LOOP_SPIN",
        "WARMSERVE_GC_FREEZE",
    ],
)
@pytest.mark.parametrize("value", ["off", "on", "enabled"])
def test_a_switch_of_another_word_is_refused_at_start(monkeypatch, variable, value):
    # workers read these where they act and have no one to tell: "off" meant on for the
    # first two, and "on" meant off for the loop spin
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=rf"{variable} must be 1 or 0 .*, got '{value}'"):
        server_config_from_env()


def test_a_model_toml_that_is_not_utf8_is_refused_and_the_scan_goes_on(tmp_path):
    # msgspec raised UnicodeDecodeError, which the scan let through: the start ended in it
    _repo(tmp_path)
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "model.toml").write_bytes('name = "modèle"\n'.encode("latin-1"))
    sources, refused = scan(tmp_path, BundleCache(tmp_path / "cache"))
    assert [s.model.name for s in sources] == ["m"]
    assert refused == [
        f"{tmp_path / 'latin1' / 'model.toml'}: not UTF-8 text (byte 0xe8 at offset 11)"
    ]


def test_a_relay_ring_too_large_to_map_is_refused(monkeypatch):
    # 64 slots of ~1 TB: every start of a relay failed with ENOMEM, the server never ready
    monkeypatch.setenv("WARMSERVE_RELAY_RING_SLOT_KIB", "1000000000")
    with pytest.raises(ConfigError, match=r"a relay's ring, .* must be at most 67108864 KiB"):
        server_config_from_env()
    monkeypatch.setenv("WARMSERVE_RELAY_RING_SLOT_KIB", "1024")
    monkeypatch.setenv("WARMSERVE_RELAY_RING_SLOTS", "65536")  # (exactly 64 GiB: taken)
    assert server_config_from_env().relay_ring_slots == 65536


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # a typo names the table and every setting it allows
        (
            {"pool": {"worker": 2}},
            r"unknown field `worker` in pool; allowed: workers, max_inflight_per_worker, ",
        ),
        ({"max_batchsize": 8}, r"unknown field `max_batchsize` in the top level; allowed: name, "),
        (
            {"inputs": [{"name": "X", "datatype": "FP32", "shape": [4], "dims": [4]}]},
            r"unknown field `dims` in inputs\[0\]; allowed: name, datatype, shape$",
        ),
        # a missing setting is named as msgspec names it; a long value is cut short
        ({"backend": None}, r"model.toml: Object missing required field `backend`$"),
        ({"pool": {"workers": [1] * 100}}, r"pool.workers = \[1, 1, .*\.\.\.: Expected `int`"),
        # a wrong type names the setting and the value written
        ({"pool": {"workers": "2"}}, r"pool.workers = '2': Expected `int`, got `str`$"),
        ({"pool": {"watchdog_s": "30s"}}, r"pool.watchdog_s = '30s': Expected `float`"),
        (
            {"inputs": [{"name": "X", "datatype": "FP32", "shape": [4, "n"]}]},
            r"inputs\[0\].shape\[1\] = 'n': Expected `int`, got `str`$",
        ),
        (
            {"backend": "tensorflow"},
            r"backend = 'tensorflow': Invalid enum value 'tensorflow'; allowed: 'onnx', 'torch'$",
        ),
        (
            {"pool": {"worker_start": "fork"}},
            r"pool.worker_start = 'fork': Invalid enum value 'fork'; allowed: 'template', 'spawn'",
        ),
    ],
)
def test_a_typo_or_a_wrong_type_is_explained_as_written(tmp_path, changes, message):
    with pytest.raises(InvalidBundleError, match=message):
        load_model_dir(_repo(tmp_path, **changes) / "m")


def test_a_manifest_edited_by_hand_is_explained_as_written(tmp_path):
    import msgspec

    from serve.bundles.build import build_bundle
    from serve.bundles.verify import verify_bundle

    bundle = build_bundle(_repo(tmp_path) / "m", tmp_path / "bundle")
    written = msgspec.json.decode((bundle.path / "manifest.json").read_bytes())
    for table, key, value, message in [
        ("pool", "workers", "2", r"model.pool.workers = '2': Expected `int`, got `str`$"),
        (
            "pool",
            "worker",
            2,
            r"Object contains unknown field `worker` in model.pool; allowed: workers, ",
        ),
    ]:
        edited = {**written, "model": {**written["model"], table: {key: value}}}
        (bundle.path / "manifest.json").write_bytes(msgspec.json.encode(edited, order="sorted"))
        with pytest.raises(InvalidBundleError, match=r"manifest.json is invalid: " + message):
            verify_bundle(bundle.path)


def test_a_manifest_with_a_directory_is_refused_not_silently_replaced(tmp_path):
    import msgspec

    from serve.bundles.build import build_bundle
    from serve.bundles.verify import verify_bundle

    bundle = build_bundle(_repo(tmp_path) / "m", tmp_path / "bundle")
    written = msgspec.json.decode((bundle.path / "manifest.json").read_bytes())
    edited = {**written, "model": {**written["model"], "directory": "/srv/models/m"}}
    (bundle.path / "manifest.json").write_bytes(msgspec.json.encode(edited, order="sorted"))
    with pytest.raises(
        InvalidBundleError, match=r"model.directory must be empty .*'/srv/models/m'"
    ):
        verify_bundle(bundle.path)


def test_buckets_written_out_of_order_or_twice_are_warmed_sorted_and_once(tmp_path):
    model = load_model_dir(_repo(tmp_path, batching={"buckets": [8, 2, 8, 1]}) / "m")
    assert model.batch_buckets == (1, 2, 8)


def test_a_stop_waits_for_busy_clients_at_most_the_grace_period_or_the_connections_age():
    from serve.app import connection_drain_s, shutdown_budget_s

    assert connection_drain_s(ServerConfig(max_connection_age_s=0)) == 0  # (no age: no wait)
    assert connection_drain_s(ServerConfig(grace_period_s=10, max_connection_age_s=60)) == 10
    # every connection gone by its age + gRPC's 10 % + the margin for its last calls
    assert connection_drain_s(
        ServerConfig(grace_period_s=30, max_connection_age_s=2)
    ) == pytest.approx(2 * 1.1 + 5)
    deployed = ServerConfig(drain_delay_s=10, grace_period_s=10, max_connection_age_s=10)
    assert shutdown_budget_s(deployed) == 10 + 10 + 10 + 15  # (+ the workers' and template's)


def test_an_age_that_outlasts_the_stops_wait_is_warned_of_with_the_longest_that_fits():
    from serve.supervisor import clients_left_busy_at_stop

    # the defaults: every connection reaches its age (8 s + 10 %) and is quiet 1 s later,
    # within the 10 s grace period the stop waits
    assert clients_left_busy_at_stop(ServerConfig()) is None
    assert clients_left_busy_at_stop(ServerConfig(max_connection_age_s=0)) is None  # (no age)
    assert clients_left_busy_at_stop(ServerConfig(max_connection_age_s=8.1)) is None
    warning = clients_left_busy_at_stop(ServerConfig(max_connection_age_s=8.3))
    assert warning is not None
    assert "up to 9.13 s after it opens" in warning
    assert "at most 10 s for busy clients" in warning
    assert "WARMSERVE_MAX_CONNECTION_AGE_S to 8.1 or less" in warning
    # the drain delay counts: connections age during it too
    assert (
        clients_left_busy_at_stop(
            ServerConfig(drain_delay_s=10, grace_period_s=10, max_connection_age_s=10)
        )
        is None
    )
    warning = clients_left_busy_at_stop(ServerConfig(drain_delay_s=5, max_connection_age_s=60))
    assert warning is not None and "to 12.7 or less" in warning  # ((5 + 10 - 1) / 1.1)
    # no age of a second or more fits: only a longer wait helps
    warning = clients_left_busy_at_stop(ServerConfig(grace_period_s=1, max_connection_age_s=1))
    assert warning is not None
    assert "MAX_CONNECTION_AGE_S to" not in warning
    assert warning.endswith("lengthen the drain delay or the grace period")
