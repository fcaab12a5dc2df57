"""Deadlines and back-pressure: expired requests are never computed; a full queue says so."""

from __future__ import annotations

import queue

import pytest
import tritonclient.grpc as triton

from tests.integration.conftest import spin_inputs

DISPATCH = r"model spin: dispatching"


def _start_slow_call(server, client, spin_iters, seconds: float) -> queue.Queue:
    """Send a call that occupies the spin model's only worker; return once it is computing."""
    done: queue.Queue = queue.Queue()
    dispatched = server.count_log(DISPATCH)
    client.async_infer(
        "spin", spin_inputs(spin_iters(seconds)), lambda result, error: done.put((result, error))
    )
    server.wait_for_log_count(DISPATCH, dispatched + 1)
    return done


def test_a_request_whose_deadline_passes_while_queued_is_never_computed(server, client, spin_iters):
    before = client.get_inference_statistics("spin").model_stats[0].execution_count
    slow = _start_slow_call(server, client, spin_iters, 1.5)
    with pytest.raises(triton.InferenceServerException) as caught:
        client.infer("spin", spin_inputs(1), client_timeout=0.3)
    assert "DEADLINE_EXCEEDED" in str(caught.value.status()) or "Deadline" in caught.value.message()
    _, error = slow.get(timeout=60)
    assert error is None
    client.infer("spin", spin_inputs(1))
    after = client.get_inference_statistics("spin").model_stats[0].execution_count
    assert after - before == 2, "only the slow call and the last call may have been computed"


def test_a_full_queue_answers_resource_exhausted_at_once(server, client, spin_iters):
    slow = _start_slow_call(server, client, spin_iters, 1.5)
    results: queue.Queue = queue.Queue()
    limit = client.get_model_config("spin").config  # max_queue_size is 4 in the test model
    assert limit.max_batch_size == 1
    for _ in range(6):
        client.async_infer(
            "spin", spin_inputs(1), lambda result, error: results.put((result, error))
        )
    outcomes = [results.get(timeout=60) for _ in range(6)]
    errors = [str(e.status()) for _, e in outcomes if e is not None]
    assert errors == ["StatusCode.RESOURCE_EXHAUSTED"] * 2
    assert sum(1 for r, e in outcomes if e is None) == 4
    assert slow.get(timeout=60)[1] is None
