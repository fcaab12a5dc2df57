"""The HTTP health endpoint's answers, with a stand-in runtime (no models, no processes)."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from typing import Any

from serve.errors import ModelNotReadyError
from serve.frontend import http_health
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


BIG_ANSWER = 16 << 20  # far more than the kernel buffers of both ends hold


class _BigMetrics(HttpHealth):
    """Answers every path with a BIG_ANSWER-byte body (a very large /metrics page)."""

    def answer(self, method: str, path: str) -> tuple[int, dict[str, object] | bytes]:
        return 200, b"#" * BIG_ANSWER


def _wait_for_hangup(client: socket.socket, timeout_s: float) -> bool:
    """Whether the server cut ``client``'s connection within ``timeout_s``; reads nothing."""
    poller = select.poll()
    poller.register(client, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if poller.poll(int(left * 1000) + 1):
            return True
    return False


def test_a_client_that_never_reads_its_answer_has_its_connection_cut(monkeypatch, caplog):
    monkeypatch.setattr(http_health, "WRITE_TIMEOUT_S", 0.5)

    async def main() -> bool:
        health = _BigMetrics(_Runtime(), ReadinessGate(), "127.0.0.1", 0)  # type: ignore[arg-type]
        await health.start()
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a stuck scraper
        try:
            client.connect(("127.0.0.1", health.port))
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            return await asyncio.to_thread(_wait_for_hangup, client, 30.0)
        finally:
            client.close()
            await health.stop()

    assert asyncio.run(main()), "the connection of a client that never reads stayed open"
    assert "did not take its" in caplog.text and "GET /metrics" in caplog.text


def test_a_large_answer_to_a_client_that_reads_arrives_whole():
    async def main() -> bytes:
        health = _BigMetrics(_Runtime(), ReadinessGate(), "127.0.0.1", 0)  # type: ignore[arg-type]
        await health.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(30):
                response = await reader.read()
            writer.close()
        finally:
            await health.stop()
        return response

    head, _, body = asyncio.run(main()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and len(body) == BIG_ANSWER
