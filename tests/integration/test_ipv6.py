"""The server on an IPv6 address (IPv6-only and dual-stack clusters): gRPC, the relays that
share the port, the health port and HTTP health all bind it, and the front end's own warm-up
reaches it. Tests listen on the IPv6 loopback only; ``--host ::`` (every address, both
families on Linux) takes the same code paths."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import tritonclient.grpc as triton

from serve.testing.models import build_mlp_onnx, mlp_reference
from tests.integration.harness import ServerProcess, free_port


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")


@pytest.mark.parametrize("frontends", [1, 2])  # 2: relay processes share the IPv6 port
def test_the_server_serves_on_an_ipv6_address(tmp_path, frontends):
    build_mlp_onnx(tmp_path / "repo" / "mlp_onnx")
    health_port = free_port()
    server = ServerProcess(
        tmp_path / "server.log",
        tmp_path / "repo",
        args=("--frontends", str(frontends), "--health-port", str(health_port)),
        host="::1",
    )
    try:
        server.wait_ready()
        x = np.random.default_rng(6).standard_normal((2, 64)).astype(np.float32)
        tensor = triton.InferInput("INPUT0", [2, 64], "FP32")
        tensor.set_data_from_numpy(x)
        got = server.client.infer("mlp_onnx", [tensor]).as_numpy("OUTPUT0")
        np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-5)
        assert server.http_get("/v2/health/ready") == 200
        assert server.health("readiness", url=f"[::1]:{health_port}") == "SERVING"
    finally:
        assert server.stop() == 0
