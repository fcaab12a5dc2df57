"""Inference backends. Imported only inside worker processes (they import torch/onnxruntime)."""

from serve.backends.base import Backend, load_backend

__all__ = ["Backend", "load_backend"]
