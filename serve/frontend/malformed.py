"""Request messages that do not parse get INVALID_ARGUMENT, not gRPC's UNKNOWN.

gRPC parses each request with its method's deserializer before the method runs. When that
raises (bytes that are not a message of the method's type), grpc.aio logs an ERROR with a
traceback and answers UNKNOWN ("Unexpected <class 'DecodeError'>"). On a ModelStreamInfer
stream, the stream ends, and so do the other requests in flight on it. A client's bad bytes
are its own error, and they must not fill the server's log either.

So every method's parser is made tolerant (``tolerant_handler``): a message that does not parse
becomes a MalformedRequest. Reading any field of it raises InvalidInputError, which the
inference methods already answer INVALID_ARGUMENT (a request on a stream gets its own
error_message). Every other method is wrapped so that it answers INVALID_ARGUMENT before it
runs. Relayed calls say the same: the relay hub parses their bytes itself (relay_hub.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from serve.errors import InvalidInputError

MALFORMED = "malformed request message"


def describe(error: DecodeError) -> str:
    """What a caller whose bytes did not parse is told."""
    return f"{MALFORMED}: {error}"


class MalformedRequest:
    """Stands in for a request message that did not parse: reading any of its fields raises
    InvalidInputError saying so."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __getattr__(self, name: str) -> NoReturn:
        raise InvalidInputError(self.reason)


def tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``parse``, returning a MalformedRequest where it would raise DecodeError."""

    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as error:
            return MalformedRequest(describe(error))

    return parse_or_mark


def tolerant_handler(handler: Any, *, refuse: bool) -> Any:
    """``handler`` (a grpc.RpcMethodHandler) with a tolerant parser. With ``refuse``, a method
    whose request is one message answers a MalformedRequest INVALID_ARGUMENT before it runs
    (one more call per request: for the methods off the hot path); without, the method itself
    meets it (the inference methods, whose errors are translated where they read the request)."""
    parse = handler.request_deserializer
    if parse is None:
        return handler
    serialize = handler.response_serializer
    parse = tolerant(parse)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(handler.stream_stream, parse, serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(handler.stream_unary, parse, serialize)
    if handler.response_streaming:
        behaviour = _refusing(handler.unary_stream) if refuse else handler.unary_stream
        return grpc.unary_stream_rpc_method_handler(behaviour, parse, serialize)
    behaviour = _refusing(handler.unary_unary) if refuse else handler.unary_unary
    return grpc.unary_unary_rpc_method_handler(behaviour, parse, serialize)


def _refusing(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` answering a MalformedRequest INVALID_ARGUMENT instead of running. grpc.aio
    tells a coroutine method from a generator or a plain function by its function, and runs the
    latter differently (a plain one in its thread pool), so only a coroutine function is wrapped
    (every method this server serves is one); any other is left as it is."""
    if not inspect.iscoroutinefunction(method):
        return method

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await method(request, context)

    return call
