"""Plain-HTTP health endpoints for httpGet probes, agreeing with the gRPC ones:
``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]/ready``; and
``/warmserve/models/{name}/latency``: the rolling P50/P95/P99 windows as JSON; ``/metrics``:
Prometheus exposition.

200 means yes, 503 no, 404 an unknown model. The server reads one request head (bounded in
size and time), answers (bounded in time: a client that does not read its answer, a stuck
scraper, has its connection cut), and closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve.errors import ModelNotFoundError, ModelNotReadyError
from serve.frontend.gate import ReadinessGate
from serve.runtime import Runtime

log = logging.getLogger(__name__)

HEAD_LIMIT = 8192
READ_TIMEOUT_S = 5.0
# How long an answer may take to be taken by its client (a /metrics page is ~100 KiB; a
# Prometheus scrape's own timeout is 10 s by default). Past it the connection is cut: a client
# that stopped reading would otherwise hold the connection and the answer's buffer for ever.
WRITE_TIMEOUT_S = 10.0
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HttpHealth:
    def __init__(self, runtime: Runtime, gate: ReadinessGate, host: str, port: int) -> None:
        self._runtime = runtime
        self._gate = gate
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=HEAD_LIMIT
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("HTTP health listening on %s:%d", self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def answer(self, method: str, path: str) -> tuple[int, dict[str, object] | bytes]:
        if method not in ("GET", "HEAD"):
            return 405, {"error": f"method {method} not allowed; use GET"}
        if path.split("?", 1)[0] == "/metrics":
            return 200, generate_latest(self._runtime.metrics.registry)
        parts = [p for p in path.split("?", 1)[0].split("/") if p]
        if parts == ["v2", "health", "live"]:
            return 200, {"live": True}
        if parts == ["v2", "health", "ready"]:
            ready = self._gate.open and self._runtime.ready
            return (200 if ready else 503), {"ready": ready}
        if len(parts) == 4 and parts[:2] == ["warmserve", "models"] and parts[3] == "latency":
            try:
                service = self._runtime.service(parts[2])
            except ModelNotFoundError as exc:
                return 404, {"error": str(exc)}
            except ModelNotReadyError as exc:  # known, with no active version (yet)
                return 503, {"error": str(exc)}
            report = service.latency.report()
            report["breakdown_us"] = service.stats.breakdown_us()
            report.update(
                name=parts[2],
                queue_depth=service.batcher.queue_depth,
                workers_target=service.pool.target,
                workers_warm=service.pool.warm_count,
                workers_passing_probes=len(service.controller.healthy_workers()),
            )
            return 200, report
        if len(parts) in (4, 6) and parts[:2] == ["v2", "models"] and parts[-1] == "ready":
            version = parts[4] if len(parts) == 6 and parts[3] == "versions" else ""
            if len(parts) == 6 and parts[3] != "versions":
                return 404, {"error": f"no route {path}"}
            try:
                self._runtime.service(parts[2], version)
            except ModelNotFoundError as exc:
                return 404, {"error": str(exc)}
            except ModelNotReadyError:
                pass  # known, with no active version: not ready
            ready = self._gate.open and self._runtime.model_ready(parts[2], version)
            return (200 if ready else 503), {"name": parts[2], "ready": ready}
        return 404, {"error": f"no route {path}"}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method, path = "GET", "(a malformed request)"
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            code, body = self.answer(method, path)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            code, body, method = 400, {"error": "malformed or incomplete HTTP request"}, "GET"
        except ConnectionError:
            writer.close()
            return
        except Exception:  # a bug: the caller gets a 500, the log the traceback
            log.exception("HTTP health endpoint failed")
            code, body, method = 500, {"error": "internal error; see the server log"}, "GET"
        if isinstance(body, bytes):
            payload, content_type = body, CONTENT_TYPE_LATEST
        else:
            payload, content_type = json.dumps(body).encode(), "application/json"
        response = (
            f"HTTP/1.1 {code} {REASONS[code]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode() + (payload if method != "HEAD" else b"")
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                writer.write(response)
                writer.close()  # once every byte of the answer has left ...
                await writer.wait_closed()  # ... which a client that does not read never lets
        except ConnectionError:
            pass
        except TimeoutError:
            log.warning(
                "HTTP health: %s did not take its %d-byte answer to %s %s within %g s; "
                "cutting the connection",
                writer.get_extra_info("peername"),
                len(response),
                method,
                path,
                WRITE_TIMEOUT_S,
            )
            _cut(writer)
        finally:
            writer.close()


def _cut(writer: asyncio.StreamWriter) -> None:
    """Drop a connection at once with what it still has to send, in the process and in the
    kernel: a reset (SO_LINGER 0), not a FIN queued behind bytes the client never takes."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # (already gone: the abort is all there is to do)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
