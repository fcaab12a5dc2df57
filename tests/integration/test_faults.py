"""Real faults on a real server: models whose code misbehaves for some inputs only, workers that
die as soon as they serve. Each fault must cost the request at fault, never a worker's life or
another caller's answer, and never a tight restart loop."""

from __future__ import annotations

import os
import queue
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.testing.models import build_spin_torch
from tests.integration.conftest import merged_behind_a_busy_worker, spin_inputs
from tests.integration.harness import ServerProcess, wait_until

pytestmark = pytest.mark.integration

# The spin model answers Y = X[:, :1]; this postprocess returns a malformed Y for some values.
BAD_OUTPUTS = """\
import numpy as np


def postprocess(outputs):
    y = outputs["Y"]
    if (y == 7.0).any():  # a scalar instead of one row per batch row
        return {"Y": np.array(7.0, dtype=np.float32)}
    if (y == 8.0).any():  # no rows at all
        return {"Y": y[:0]}
    if (y == 6.0).any():  # two values per row where the config says one
        return {"Y": np.concatenate([y, y], axis=1)}
    return outputs
"""


def _spin_with(tmp_path: Path, code: str, **config: Any) -> Path:
    """The spin model (repository ``tmp_path/repo``) with ``code`` as its process module."""
    folder = build_spin_torch(tmp_path / "repo" / "spin", process="process.py", **config)
    (folder / "process.py").write_text(code)
    return folder


def _merging_spin_server(tmp_path: Path, code: str) -> ServerProcess:
    """A server (not yet ready) of the spin model with ``code`` as its process module, whose
    queued requests merge into batches of up to 8, logging each dispatch (DEBUG)."""
    _spin_with(tmp_path, code, max_batch_size=8, batching={"max_queue_size": 16})
    return ServerProcess(tmp_path / "server.log", tmp_path / "repo", args=("--log-level", "DEBUG"))


def _status(call) -> tuple[str, str]:
    with pytest.raises(triton.InferenceServerException) as caught:
        call()
    return str(caught.value.status()), caught.value.message()


@pytest.fixture()
def bad_outputs(tmp_path):
    server = _merging_spin_server(tmp_path, BAD_OUTPUTS)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_an_output_of_the_wrong_shape_fails_that_call_and_the_worker_lives_on(bad_outputs):
    server = bad_outputs
    (worker,) = server.worker_pids()
    status, message = _status(lambda: server.client.infer("spin", spin_inputs(1, value=7.0)))
    assert status == "StatusCode.INTERNAL", message
    assert "output 'Y'" in message
    assert server.worker_pids() == [worker]  # not crashed, not retried onto a replacement
    status, message = _status(lambda: server.client.infer("spin", spin_inputs(1, value=6.0)))
    assert status == "StatusCode.INTERNAL", message
    assert "output 'Y' has shape [1, 2], the model config says [-1, 1]" in message
    assert server.client.infer("spin", spin_inputs(1, value=3.0)).as_numpy("Y").tolist() == [[3.0]]
    assert "lost: " not in server.log()


def test_a_merged_batch_with_one_malformed_answer_fails_only_that_request(bad_outputs):
    outcomes = merged_behind_a_busy_worker(bad_outputs, [(1, 2.0), (1, 8.0), (1, 4.0)])
    for value in (1.0, 2.0, 4.0):
        result, error = outcomes[value]
        assert error is None, f"{value}: {error}"
        assert result.as_numpy("Y").tolist() == [[value]]
    _, error = outcomes[8.0]
    assert error is not None and error.status() == "StatusCode.INTERNAL"
    assert "output 'Y'" in error.message()


# Runs out of memory on any batch that holds X = 9.0: a request that needs more of the GPU than
# is left (CPU torch raises the same exception type as CUDA's allocator).
OUT_OF_MEMORY = """\
import torch


def preprocess(inputs):
    if (inputs["X"] == 9.0).any():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return inputs
"""


def test_a_request_that_runs_out_of_memory_fails_alone_resource_exhausted(tmp_path):
    server = _merging_spin_server(tmp_path, OUT_OF_MEMORY)
    try:
        server.wait_ready()
        (worker,) = server.worker_pids()
        outcomes = merged_behind_a_busy_worker(server, [(1, 2.0), (1, 9.0), (1, 4.0)])
        for value in (1.0, 2.0, 4.0):  # run again each on its own: they fit
            result, error = outcomes[value]
            assert error is None, f"{value}: {error}"
            assert result.as_numpy("Y").tolist() == [[value]]
        _, error = outcomes[9.0]
        assert error is not None and error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert error.message() == (
            "model 'spin': out of memory computing a batch of 1 rows: OutOfMemoryError: CUDA "
            "out of memory. Tried to allocate 20.00 GiB; send fewer rows per request, or retry "
            "later"
        )
        assert server.worker_pids() == [worker]  # the worker serves on
        oom = 'warmserve_requests_total{code="out_of_memory",model="spin"}'
        assert _metric(server, oom) == 1.0
    finally:
        assert server.stop() == 0


def _metric(server: ServerProcess, sample: str) -> float:
    _, text = server.http_text("/metrics")
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# Exits the worker on the probe's input (X = 7.0): it warms up, reports warm, dies on its probe.
DIES_ON_PROBE = """\
import os


def postprocess(outputs):
    if (outputs["Y"] == 7.0).any():
        os._exit(3)
    return outputs
"""


def test_a_worker_that_dies_on_every_probe_is_restarted_with_back_off_not_in_a_loop(tmp_path):
    folder = _spin_with(
        tmp_path,
        DIES_ON_PROBE,
        probe={"inputs_file": "probe_in.npz", "interval_s": 0.5, "timeout_s": 5.0},
    )
    np.savez(
        folder / "probe_in.npz",
        X=np.full((1, 512), 7.0, np.float32),
        ITERS=np.ones((1, 1), np.int64),
    )
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_live()
        # (without back-off every death was followed by an immediate start, forever)
        server.wait_for_log(r"next worker start in [0-9.]+ s \(back-off\)", timeout=60)
        assert "died before it answered a batch" in server.log()
        assert server.health("spin") == "NOT_SERVING"
        status, message = _status(lambda: server.client.infer("spin", spin_inputs(1)))
        assert status == "StatusCode.UNAVAILABLE", message
    finally:
        assert server.stop() == 0


def test_a_model_whose_replacement_workers_fail_to_warm_up_says_why_it_is_not_ready(tmp_path):
    broken = tmp_path / "broken"
    code = (  # new workers fail to load it once the test says so; running ones go on
        "import pathlib\n"
        f"if pathlib.Path({str(broken)!r}).exists():\n"
        "    raise RuntimeError('the scratch disk is gone')\n"
    )
    _spin_with(
        tmp_path,
        code,
        pool={"workers": 2, "min_warm": 2, "threads": 1, "max_inflight_per_worker": 1},
        probe={"interval_s": 0.2},  # the worker that serves answers probes all along
    )
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_ready()
        broken.touch()
        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        # The back-off grows while the other worker serves (its answers are no sign that the
        # starts recovered); then it is 0.5, 1, 2 s between starts, not a tight loop.
        server.wait_for_log(r"next worker start in 2\.0 s \(back-off\)", timeout=60)
        assert server.health("spin") == "NOT_SERVING"
        (status,) = server.client.get_model_repository_index().models
        assert "1 of 2 warm workers" in status.reason, status.reason
        assert "the scratch disk is gone" in status.reason, status.reason
        broken.unlink()  # the cause goes away: the next start (after its back-off) serves again
        wait_until(lambda: server.health("spin") == "SERVING", 60, "the model serving again")
    finally:
        assert server.stop() == 0


# Crashes the worker in native code (a null pointer read) on X = 5.0.
SEGFAULTS = """\
import ctypes


def postprocess(outputs):
    if (outputs["Y"] == 5.0).any():
        ctypes.string_at(0)
    return outputs
"""


def test_a_worker_that_crashes_in_native_code_leaves_the_python_stack_in_the_log(tmp_path):
    _spin_with(tmp_path, SEGFAULTS)
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_ready()
        status, message = _status(lambda: server.client.infer("spin", spin_inputs(1, value=5.0)))
        assert status == "StatusCode.UNAVAILABLE", message  # (its retry crashed a second worker)
        server.wait_for_log("Fatal Python error: Segmentation fault")
        server.wait_for_log(r"process\.py\", line 6 in postprocess")
        wait_until(lambda: server.health("spin") == "SERVING", 60, "a replacement serving")
        assert server.client.infer("spin", spin_inputs(1, value=3.0)).as_numpy("Y").tolist() == [
            [3.0]
        ]
    finally:
        assert server.stop() == 0


# Ends the worker's process on X = 7.0 (a native crash, an OOM kill: the request at fault).
EXITS_ON_SEVEN = """\
import os


def postprocess(outputs):
    if (outputs["Y"] == 7.0).any():
        os._exit(3)
    return outputs
"""


def test_a_request_that_kills_its_worker_fails_alone_not_with_those_merged_with_it(tmp_path):
    # Its batch is retried once; run merged again it would kill the replacement together with
    # the others' second (and last) chance. Retried one by one, only it fails.
    server = _merging_spin_server(tmp_path, EXITS_ON_SEVEN)
    try:
        server.wait_ready()
        client = server.client
        results: queue.Queue = queue.Queue()

        def send(iters: int, value: float) -> None:
            client.async_infer(
                "spin",
                spin_inputs(iters, value),
                lambda result, error, value=value: results.put((value, result, error)),
                client_timeout=120,
            )

        send(20000, 1.0)  # keeps the only worker busy while the next three queue
        server.wait_for_log_count("model spin: dispatching 1 rows from 1 requests", 1)
        for value in (2.0, 7.0, 4.0):
            send(1, value)
        server.wait_for_log("model spin: 3 requests wait for a worker")
        outcomes = {}
        for _ in range(4):
            value, result, error = results.get(timeout=120)
            outcomes[value] = (result, error)
        assert "dispatching 3 rows from 3 requests" in server.log()  # they did merge
        for value in (1.0, 2.0, 4.0):
            result, error = outcomes[value]
            assert error is None, f"{value}: {error}"
            assert result.as_numpy("Y").tolist() == [[value]]
        _, error = outcomes[7.0]
        assert error is not None and error.status() == "StatusCode.UNAVAILABLE"
    finally:
        assert server.stop() == 0


def test_a_worker_that_hangs_warming_up_does_not_hold_the_ready_ones_back(tmp_path):
    # min_warm = 1 of 2 workers: the model is ready once one is warm and passes its probe,
    # not only when the other's start-up times out (startup_timeout_s, 300 s by default).
    claimed = tmp_path / "claimed"
    code = (  # the first worker to load it hangs there
        "import os, time\n"
        "try:\n"
        f"    os.close(os.open({str(claimed)!r}, os.O_CREAT | os.O_EXCL))\n"
        "except FileExistsError:\n"
        "    pass\n"
        "else:\n"
        "    time.sleep(3600)\n"
    )
    _spin_with(
        tmp_path, code, pool={"workers": 2, "min_warm": 1, "threads": 1, "startup_timeout_s": 600}
    )
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_ready(timeout=60)
        assert claimed.exists()
        assert server.client.infer("spin", spin_inputs(1, value=3.0)).as_numpy("Y").tolist() == [
            [3.0]
        ]
    finally:
        assert server.stop() == 0
    # stopping, the one still warming up is killed: it has nothing to finish, and it would
    # read the request to exit only once warm (here: never, so after the stop timeout)
    assert "did not exit within" not in server.log()


def test_a_model_whose_first_start_fails_is_started_again_once_the_cause_is_gone(tmp_path):
    # Nothing else restarts it outside Kubernetes, and a pod restart takes minutes
    broken = tmp_path / "broken"
    broken.touch()
    code = (  # workers fail to load it while the file exists
        "import pathlib\n"
        f"if pathlib.Path({str(broken)!r}).exists():\n"
        "    raise RuntimeError('the GPU is still held by another process')\n"
    )
    _spin_with(tmp_path, code)
    server = ServerProcess(tmp_path / "server.log", tmp_path / "repo")
    try:
        server.wait_for_log(r"model spin version 1 is not serving \(.*\); starting it again in 5 s")
        assert server.health("spin") == "NOT_SERVING"
        status, message = _status(lambda: server.client.infer("spin", spin_inputs(1)))
        assert status == "StatusCode.UNAVAILABLE", message
        assert "the GPU is still held by another process" in message, message
        broken.unlink()  # the cause goes away: the next start serves
        wait_until(lambda: server.health("spin") == "SERVING", 60, "the model serving")
        assert server.client.is_server_ready()
        result = server.client.infer("spin", spin_inputs(1, value=3.0))
        assert float(result.as_numpy("Y")[0, 0]) == 3.0
        assert server.count_log("serves after starting again") == 1
    finally:
        assert server.stop() == 0
