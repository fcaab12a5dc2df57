"""gRPC's ERROR-with-traceback for an answer it could not send (the call had ended) becomes one
INFO line; every other gRPC record passes untouched."""

from __future__ import annotations

import logging

import pytest
from grpc._cython import cygrpc

from serve.frontend.grpc_logs import GRPC_LOGGER, install


@pytest.fixture
def grpc_logger(caplog):
    install()
    install()  # idempotent
    logger = logging.getLogger(GRPC_LOGGER)
    assert len(logger.filters) == 1
    caplog.set_level(logging.DEBUG, logger=GRPC_LOGGER)
    return logger


def _raise(exc: BaseException) -> None:
    raise exc


def test_an_answer_that_could_not_be_sent_is_one_info_line_naming_the_method(grpc_logger, caplog):
    method = "/inference.GRPCInferenceService/ModelInfer"
    try:
        _raise(cygrpc.ExecuteBatchError('Failed "execute_batch": (...)'))
    except cygrpc.ExecuteBatchError:
        grpc_logger.exception("ExecuteBatchError raised in core by servicer method [%s]", method)
    (record,) = caplog.records
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == (
        f"{method}: the call ended before its answer was sent (client gone or deadline passed)"
    )
    assert "Traceback" not in caplog.text


def test_other_grpc_errors_keep_their_level_and_traceback(grpc_logger, caplog):
    try:
        _raise(RuntimeError("a real failure"))
    except RuntimeError:
        grpc_logger.exception(
            "Unexpected [%s] raised by servicer method [%s]", "RuntimeError", "/x"
        )
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "Traceback" in caplog.text and "a real failure" in caplog.text
