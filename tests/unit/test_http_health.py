"""The HTTP health endpoint's answers, with a stand-in runtime (no models, no processes)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from serve.errors import ModelNotReadyError
from serve.frontend.gate import ReadinessGate
from serve.frontend.http_health import HttpHealth


class _Runtime:
    """A model known but with no active version; readiness itself broken (a bug)."""

    def service(self, name: str, version: str = "") -> Any:
        raise ModelNotReadyError(f"model {name!r} has no active version")

    @property
    def ready(self) -> bool:
        raise RuntimeError("a bug in readiness")


async def _get(path: str) -> tuple[str, dict[str, Any]]:
    gate = ReadinessGate()
    gate.set(True)
    health = HttpHealth(_Runtime(), gate, "127.0.0.1", 0)  # type: ignore[arg-type]
    await health.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        async with asyncio.timeout(10):
            response = await reader.read()
        writer.close()
    finally:
        await health.stop()
    head, _, body = response.decode().partition("\r\n\r\n")
    return head.split("\r\n", 1)[0], json.loads(body)


def test_the_latency_of_a_model_with_no_active_version_is_503_not_a_dropped_connection():
    status, body = asyncio.run(_get("/warmserve/models/m/latency"))
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert "no active version" in body["error"]


def test_a_failing_route_answers_500_and_logs_why(caplog):
    status, body = asyncio.run(_get("/v2/health/ready"))
    assert status == "HTTP/1.1 500 Internal Server Error"
    assert body == {"error": "internal error; see the server log"}
    assert "a bug in readiness" in caplog.text
