"""The protocol's RPCs warmserve does not serve: each answers UNIMPLEMENTED saying what is not
supported and what to do instead.

The generated base class answers them by raising NotImplementedError, which grpc.aio runs in a
thread of the default executor and logs as an error with a traceback on every call; the caller
reads "Unexpected <class 'NotImplementedError'>: Method not implemented!".
"""

from __future__ import annotations

from typing import Any

from serve.errors import UnsupportedError
from serve.frontend.status import translate_errors

SHARED_MEMORY = (
    "the {kind} shared-memory extension is not supported by this server: send input tensors "
    "in the request (raw_input_contents) and read outputs from the response"
)


def _refuse(what: str) -> Any:
    @translate_errors
    async def handler(self: Any, request: Any, context: Any) -> Any:
        raise UnsupportedError(what)

    return handler


class UnservedRpcs:
    """Mixed into the servicer ahead of the generated base class."""

    SystemSharedMemoryStatus = _refuse(SHARED_MEMORY.format(kind="system"))
    SystemSharedMemoryRegister = _refuse(SHARED_MEMORY.format(kind="system"))
    SystemSharedMemoryUnregister = _refuse(SHARED_MEMORY.format(kind="system"))
    CudaSharedMemoryStatus = _refuse(SHARED_MEMORY.format(kind="CUDA"))
    CudaSharedMemoryRegister = _refuse(SHARED_MEMORY.format(kind="CUDA"))
    CudaSharedMemoryUnregister = _refuse(SHARED_MEMORY.format(kind="CUDA"))
    TraceSetting = _refuse("the trace extension is not supported by this server")
    LogSettings = _refuse(
        "the logging extension is not supported by this server: set the log level at start "
        "(--log-level)"
    )
