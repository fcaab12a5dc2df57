"""The one table that maps domain errors to gRPC status codes."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from serve import errors

log = logging.getLogger(__name__)

STATUS: tuple[tuple[type[errors.ServeError], grpc.StatusCode], ...] = (
    (errors.InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),  # includes WorkerLostError
    (errors.QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.AnswerTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # as gRPC's own limit
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.InvalidBundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnsupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (errors.ModelOutOfMemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # before its base
    (errors.ModelExecutionError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for an exception."""
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code, str(exc)
    trace_id = uuid.uuid4().hex[:16]
    log.error("internal error (trace id %s)", trace_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error; trace id {trace_id} (see the server log)"


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """End the call with the status for ``exc`` (a gRPC abort already under way goes on)."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code, message = status_for(exc)
    await context.abort(code, message)


def translate_errors(handler: Handler) -> Handler:
    """Turn any exception a servicer method raises into a gRPC status on that call only."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            await abort_with(context, exc)

    return wrapper  # type: ignore[return-value]
