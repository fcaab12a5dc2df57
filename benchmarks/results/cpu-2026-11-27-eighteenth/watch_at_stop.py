"""Evidence (eighteenth session): how long a stop takes with one health Watch open, and how
the Watch ends. A server (the demo MLP, grace period 30 s) with one grpc.health.v1 Watch
client; SIGTERM once it has streamed SERVING; the seconds until the server exits and what the
Watch saw. Run it in the tree to measure (the session ran it at 60fa7a6, before the change,
and after it).

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-27-eighteenth/watch_at_stop.py FRONTENDS
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.testing.models import build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until


def main() -> None:
    frontends = sys.argv[1]
    with tempfile.TemporaryDirectory() as folder:
        build_mlp_onnx(Path(folder) / "repo" / "mlp_onnx")
        server = ServerProcess(
            Path(folder) / "server.log",
            Path(folder) / "repo",
            args=("--grace-period", "30", "--frontends", frontends),
        )
        seen: list[object] = []
        try:
            wait_until(server.ready_over_http, 120, "ready")
            channel = grpc.insecure_channel(server.url)
            stub = health_pb2_grpc.HealthStub(channel)

            def watch() -> None:
                try:
                    for message in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                        seen.append(
                            health_pb2.HealthCheckResponse.ServingStatus.Name(message.status)
                        )
                    seen.append("ended OK")
                except grpc.RpcError as exc:
                    seen.append(f"ended {exc.code().name} ({exc.details()})")

            threading.Thread(target=watch, daemon=True).start()
            wait_until(lambda: bool(seen), 10, "the first status")
            server.client.close()
            signalled = time.monotonic()
            server.terminate()
            server.process.wait(60)
            exited = time.monotonic() - signalled
            channel.close()
        finally:
            server.stop()
        print(f"--frontends {frontends}: exit {exited:.1f} s after SIGTERM; the Watch saw {seen}")


if __name__ == "__main__":
    main()
