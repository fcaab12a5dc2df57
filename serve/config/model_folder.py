"""Reading a model folder's ``model.toml``, and msgspec's errors said as the user wrote them."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Literal

import msgspec

from serve.config.model import (
    MODEL_CONFIG_FILE,
    BatchingConfig,
    ModelConfig,
    PoolConfig,
    ProbeConfig,
    TensorSpec,
)
from serve.config.model_checks import validate_model
from serve.errors import InvalidBundleError


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
