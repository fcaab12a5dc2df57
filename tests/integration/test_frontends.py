"""Several front-end processes on one port (``--frontends 2``): connections spread over them,
the supervisor answers health and /metrics for all, restarts one that dies, and stops all of
them (and their workers) on SIGTERM or when it is itself killed."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.testing.models import build_identity_onnx
from tests.integration.harness import ServerProcess, _cmdline, wait_until

pytestmark = pytest.mark.integration

FRONTENDS = 2
CHANNELS = 16  # connections: the chance that all land on one of two processes is 2**-15


@pytest.fixture()
def supervised(tmp_path: Path):
    repository = tmp_path / "repository"
    build_identity_onnx(repository / "identity", types=("FP32",))
    server = ServerProcess(
        tmp_path / "server.log", repository, args=("--frontends", str(FRONTENDS))
    )
    try:
        wait_until(lambda: _ready(server), 120, "every front-end process ready")
        yield server
    finally:
        server.stop()


def _ready(server: ServerProcess) -> bool:
    if server.process.poll() is not None:
        raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
    try:
        return server.http_get("/v2/health/ready") == 200
    except OSError:
        return False


def frontend_pids(server: ServerProcess) -> list[int]:
    """The supervisor's front-end processes (spawned; not its resource tracker)."""
    children = server._children().get(server.process.pid, [])
    return sorted(pid for pid in children if b"spawn_main" in _cmdline(pid))


def descendants(server: ServerProcess, pids: list[int]) -> list[int]:
    children = server._children()
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def infer_on_separate_connections(url: str, channels: int, salt: int) -> None:
    """One call per connection (distinct channel arguments keep gRPC from sharing one), each
    checked against its own input."""
    for i in range(channels):
        client = triton.InferenceServerClient(url, channel_args=[("warmserve.test.conn", i + salt)])
        try:
            x = np.full((1, 5), i + salt, dtype=np.float32)
            tensor = triton.InferInput("IN_FP32", [1, 5], "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer("identity", [tensor]).as_numpy("OUT_FP32")
            np.testing.assert_array_equal(result, x)
        finally:
            client.close()


def requests_by_frontend(server: ServerProcess) -> dict[str, float]:
    status, text = server.http_text("/metrics")
    assert status == 200
    counts: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"warmserve_requests_total\{(.*)\} (\S+)$", line)
        if match and 'code="ok"' in match.group(1) and 'model="identity"' in match.group(1):
            frontend = re.search(r'frontend="(\d+)"', match.group(1))
            assert frontend is not None, line
            counts[frontend.group(1)] = counts.get(frontend.group(1), 0) + float(match.group(2))
    return counts


def test_connections_spread_over_the_frontends_and_metrics_show_each(supervised):
    assert len(frontend_pids(supervised)) == FRONTENDS
    infer_on_separate_connections(supervised.url, CHANNELS, salt=0)
    counts = requests_by_frontend(supervised)
    assert set(counts) == {str(i) for i in range(FRONTENDS)}, counts
    assert all(n > 0 for n in counts.values()), counts
    status, body = supervised.http_json("/v2/health/ready")
    assert (status, body["frontends_ready"]) == (200, [True] * FRONTENDS)
    status, body = supervised.http_json("/warmserve/models/identity/latency")
    assert status == 200 and [r["frontend"] for r in body["frontends"]] == list(range(FRONTENDS))
    assert supervised.http_get("/warmserve/models/nope/latency") == 404
    assert supervised.http_get("/v2/models/nope/ready") == 404


def test_a_frontend_that_dies_is_restarted_and_serves_again(supervised):
    victim, survivor = frontend_pids(supervised)
    os.kill(victim, signal.SIGKILL)
    supervised.wait_for_log(r"front-end process \d exited with code -9")
    wait_until(lambda: _ready(supervised), 120, "ready again after the restart")
    pids = frontend_pids(supervised)
    assert survivor in pids and victim not in pids and len(pids) == FRONTENDS
    restarted = re.search(r"front-end process (\d) exited with code -9", supervised.log())
    assert restarted is not None
    index = restarted.group(1)
    _, metrics = supervised.http_text("/metrics")
    assert f'warmserve_frontend_restarts{{frontend="{index}"}} 1.0' in metrics
    infer_on_separate_connections(supervised.url, CHANNELS, salt=100)
    assert requests_by_frontend(supervised).get(index, 0) > 0  # the new process serves


def test_sigterm_stops_every_frontend_and_its_workers(supervised):
    tree = descendants(supervised, frontend_pids(supervised))
    assert len(tree) > FRONTENDS  # the front-end processes and their workers
    assert supervised.stop() == 0
    wait_until(lambda: not any(alive(p) for p in tree), 30, "every descendant gone")
    assert "supervisor: stopped" in supervised.log()


def test_frontends_stop_when_the_supervisor_is_killed(supervised):
    tree = descendants(supervised, frontend_pids(supervised))
    supervised.process.send_signal(signal.SIGKILL)
    supervised.process.wait(10)
    wait_until(lambda: not any(alive(p) for p in tree), 60, "every orphan gone")
    assert supervised.count_log("the supervisor is gone; stopping") == FRONTENDS
