"""The in-flight request budget in a real server: a burst that would take the request bytes held
over --max-inflight-bytes is refused RESOURCE_EXHAUSTED at once (unary calls and stream requests,
direct and relayed), the calls already admitted succeed, and the gauge returns to 0."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest
import tritonclient.grpc as triton

from serve.testing.models import build_spin_torch
from tests.integration.conftest import spin_inputs
from tests.integration.harness import ServerProcess, wait_until
from tests.integration.test_frontends import iterations_for

# A spin request (X FP32 [1, 512], ITERS INT64 [1, 1], raw contents) holds its 2056 bytes twice
# (the message's copy and the decoded one): room for exactly three.
REQUEST_BYTES = 2 * (512 * 4 + 8)
BUDGET = 3 * REQUEST_BYTES
HELD = "warmserve_inflight_request_bytes"
REFUSED = 'warmserve_requests_total{code="inflight_bytes_full",model="spin"}'
DISPATCH = "model spin: dispatching"


def _metric(server: ServerProcess, sample: str) -> float:
    _, text = server.http_text("/metrics")
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in /metrics")


def _queue_one(server: ServerProcess, results: queue.Queue, iters: int, waiting: int) -> None:
    """Send a call and return once it waits in the batcher as the ``waiting``-th request."""
    line = f"model spin: {waiting} requests wait for a worker"
    before = server.count_log(line)
    server.client.async_infer(
        "spin", spin_inputs(iters), lambda result, error: results.put((result, error))
    )
    server.wait_for_log_count(line, before + 1)


@pytest.mark.parametrize("frontends", [1, 2], ids=["direct", "relayed"])
def test_a_burst_over_the_budget_is_refused_while_admitted_calls_succeed(
    tmp_path: Path, frontends: int
):
    repository = tmp_path / "repository"
    build_spin_torch(repository / "spin")  # one worker, one row a batch, 4 requests queued
    args = ("--frontends", str(frontends), "--log-level", "DEBUG")
    args += ("--max-inflight-bytes", str(BUDGET))
    server = ServerProcess(tmp_path / "server.log", repository, args=args)
    try:
        wait_until(server.ready_over_http, 120, "ready")
        assert _metric(server, HELD + "_limit") == BUDGET
        client = server.client
        iters = iterations_for(server, 5.0)
        admitted: queue.Queue = queue.Queue()
        dispatched = server.count_log(DISPATCH)
        client.async_infer(
            "spin", spin_inputs(iters), lambda result, error: admitted.put((result, error))
        )
        server.wait_for_log_count(DISPATCH, dispatched + 1)  # computing, for seconds
        _queue_one(server, admitted, 1, 1)
        _queue_one(server, admitted, 1, 2)
        assert _metric(server, HELD) == BUDGET  # the three admitted hold it all

        burst: queue.Queue = queue.Queue()
        for _ in range(4):
            client.async_infer(
                "spin", spin_inputs(1), lambda result, error: burst.put((result, error))
            )
        refusals = [burst.get(timeout=60) for _ in range(4)]
        streamed: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: streamed.put((result, error)))
        try:
            client.async_stream_infer("spin", spin_inputs(1), request_id="streamed")
            refusals.append(streamed.get(timeout=60))
        finally:
            client.stop_stream()

        for result, error in refusals:
            assert result is None and error is not None
            assert "bytes of requests in flight" in error.message()
            assert f"(limit {BUDGET}" in error.message()
        assert [str(e.status()) for _, e in refusals[:4]] == ["StatusCode.RESOURCE_EXHAUSTED"] * 4

        outcomes = [admitted.get(timeout=120) for _ in range(3)]
        assert [e for _, e in outcomes] == [None] * 3, "the admitted calls are unharmed"
        assert _metric(server, HELD) == 0
        assert _metric(server, REFUSED) == 5
        client.infer("spin", spin_inputs(1))  # the budget is free again
        assert _metric(server, HELD) == 0
    except triton.InferenceServerException as exc:
        raise AssertionError(f"{exc}\n{server.log()[-4000:]}") from exc
    finally:
        assert server.stop() == 0
