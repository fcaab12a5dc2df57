"""gRPC's own log lines about calls whose client went away, made to say so in one line.

When a call ends before its answer is sent (the client disconnected, cancelled, or its deadline
passed while the answer was on its way), grpc.aio logs the failed send at ERROR with a traceback
("ExecuteBatchError raised in core by servicer method [...]"). For a server that is a routine
event, not an error, and a burst of disconnects would bury real errors under tracebacks. This
filter turns exactly those records into one INFO line naming the method; every other gRPC record
passes untouched.
"""

from __future__ import annotations

import logging

GRPC_LOGGER = "grpc._cython.cygrpc"


class CallGoneFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__name__ != "ExecuteBatchError":
            return True
        method = ""
        if isinstance(record.args, tuple) and record.args:
            method = str(record.args[-1])
        elif "[" in str(record.msg):
            method = str(record.msg).rsplit("[", 1)[-1].rstrip("]")
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg = (
            "%s: the call ended before its answer was sent (client gone or deadline passed)"
        )
        record.args = (method or "a call",)
        record.exc_info = None
        record.exc_text = None
        return logging.getLogger(GRPC_LOGGER).isEnabledFor(logging.INFO)


def install() -> None:
    """Add the filter to gRPC's logger (idempotent)."""
    logger = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, CallGoneFilter) for f in logger.filters):
        logger.addFilter(CallGoneFilter())
