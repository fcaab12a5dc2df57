"""One frozen configuration tree. This package is the only one that reads environment variables.

A model repository is a directory with one folder per model; each folder holds ``model.toml``
(the model's configuration, ``model.py``) and the model file it names. ``server.py`` builds the
server's settings from its flags and WARMSERVE_* variables; ``model_checks.py`` refuses model
configurations that cannot be served; ``model_folder.py`` reads a model folder.
"""

from serve.config.model import (
    CUDA_IDLE_SPIN_US,
    LIVENESS_SERVICE,
    LOG_LEVELS,
    MODEL_CONFIG_FILE,
    READINESS_SERVICE,
    RESERVED_NAMES,
    BatchingConfig,
    ModelConfig,
    PoolConfig,
    ProbeConfig,
    TensorSpec,
)
from serve.config.model_checks import model_files, validate_model
from serve.config.model_folder import explain_validation_error, load_model_dir
from serve.config.server import (
    SERVER_ENV,
    SERVER_FLAGS,
    Config,
    ServerConfig,
    cache_dir_from_env,
    default_repository_from_env,
    gc_freeze_from_env,
    loop_spin_from_env,
    malloc_tuning_from_env,
    page_lock_from_env,
    server_config_from_env,
    validate_server,
)

__all__ = [
    "CUDA_IDLE_SPIN_US",
    "LIVENESS_SERVICE",
    "LOG_LEVELS",
    "MODEL_CONFIG_FILE",
    "READINESS_SERVICE",
    "RESERVED_NAMES",
    "SERVER_ENV",
    "SERVER_FLAGS",
    "BatchingConfig",
    "Config",
    "ModelConfig",
    "PoolConfig",
    "ProbeConfig",
    "ServerConfig",
    "TensorSpec",
    "cache_dir_from_env",
    "default_repository_from_env",
    "explain_validation_error",
    "gc_freeze_from_env",
    "load_model_dir",
    "loop_spin_from_env",
    "malloc_tuning_from_env",
    "model_files",
    "page_lock_from_env",
    "server_config_from_env",
    "validate_model",
    "validate_server",
]
