"""Internal request/response/tensor types and the datatype codec. Imports nothing else of serve."""

from serve.protocol.datatypes import (
    Datatype,
    bytes_tensor_from_raw,
    bytes_tensor_to_raw,
    numpy_dtype,
)
from serve.protocol.tensors import InferRequest, InferResponse, Tensor

__all__ = [
    "Datatype",
    "InferRequest",
    "InferResponse",
    "Tensor",
    "bytes_tensor_from_raw",
    "bytes_tensor_to_raw",
    "numpy_dtype",
]
