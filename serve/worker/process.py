"""A model's own pre- and post-processing code, imported from its (verified) folder.

The module may define ``preprocess(inputs) -> dict`` (wire inputs → the model's inputs) and
``postprocess(outputs) -> dict`` (the model's outputs → wire outputs); both take and return
dicts of numpy arrays keyed by tensor name, and run inside the worker, in the same process as
the model, so code and weights of one bundle always run together.

Data the code cannot take (an image that does not decode, say) should raise
``serve.errors.InvalidInputError``: the caller gets INVALID_ARGUMENT with its message and the
worker is not suspected of being broken. Any other exception is the model's failure (INTERNAL).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy.typing as npt

from serve.config import ModelConfig

Arrays = dict[str, npt.NDArray[Any]]
Step = Callable[[Arrays], Arrays]


def _identity(arrays: Arrays) -> Arrays:
    return arrays


class Processing:
    def __init__(self, model: ModelConfig, module_name: str, source: bytes | None = None) -> None:
        """``source``: the module's code as its bundle was verified (else read from its file)."""
        self.preprocess: Step = _identity
        self.postprocess: Step = _identity
        self.build_model: Callable[..., Any] | None = None  # safetensors weights → module
        if not model.process:
            return
        path = Path(model.directory) / model.process
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        # Run the verified source itself: the import system would read a cached .pyc instead
        # (not covered by the bundle's hash) and write __pycache__/ into the bundle, an extra
        # file that makes every later verification of the bundle refuse it.
        code = path.read_bytes() if source is None else source
        exec(compile(code, str(path), "exec", dont_inherit=True), module.__dict__)
        self.preprocess = _checked(getattr(module, "preprocess", _identity), "preprocess")
        self.postprocess = _checked(getattr(module, "postprocess", _identity), "postprocess")
        self.build_model = getattr(module, "build_model", None)


def _checked(step: Step, name: str) -> Step:
    def run(arrays: Arrays) -> Arrays:
        result = step(arrays)
        if not isinstance(result, dict):
            raise TypeError(f"{name} returned {type(result).__name__}, expected a dict of arrays")
        return result

    return run
