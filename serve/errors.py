"""The domain's exception tree. Imports no grpc: the front end maps these to status codes."""

from __future__ import annotations


class ServeError(Exception):
    """Base of every error warmserve reports to a caller."""


class InvalidInputError(ServeError):
    """The request is malformed: wrong name, datatype, shape, element count or byte size."""


class ModelNotFoundError(ServeError):
    """No model (or model version) of that name is configured."""


class ModelNotReadyError(ServeError):
    """The model exists but has no warm worker able to take the request."""


class ModelFaultError(ModelNotReadyError):
    """A worker could not start because the model itself failed to load or warm up (its
    bundle, code, weights or device), not the host: starting it again fails the same way."""


class WorkerLostError(ModelNotReadyError):
    """The worker running a request died before answering."""


class QueueFullError(ServeError):
    """The model's queue is at capacity; the caller should back off and retry."""


class InflightLimitError(QueueFullError):
    """The server holds as many bytes of requests in flight as its budget allows (or this one
    request needs more than the whole budget); the caller should back off and retry."""


class AnswerTooLargeError(ServeError):
    """The answer is larger than the largest message the server may send (max_message_bytes);
    the caller should ask for fewer rows per request."""


class DeadlineExceededError(ServeError):
    """The request's deadline passed before its result was ready; it was not computed."""


class ConfigError(ServeError):
    """The server's own configuration is invalid (flags, environment)."""


class InvalidBundleError(ServeError):
    """A model's files or configuration are invalid; it cannot be loaded."""


class ModelExecutionError(ServeError):
    """The model raised while computing a batch (reported to that batch's callers only)."""


class ModelOutOfMemoryError(ModelExecutionError):
    """The model ran out of memory (its device's or the host's) computing a batch. The batch
    failed, not the worker; the caller may send fewer rows per request, or retry later."""


class UnsupportedError(ServeError):
    """The request asks for something this server does not implement."""
