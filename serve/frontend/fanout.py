"""The supervisor's HTTP port: health, latency and /metrics of every front-end process.

Each front-end process answers on a private loopback port; this server asks all of them and
combines the answers. Readiness is strict: 200 only when every front-end process is ready (a
process that is restarting counts as not ready), so the pod takes traffic only at full
strength, as with the warm-pool minimum inside one process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from serve.frontend.http_health import Answer, HttpServer
from serve.telemetry.exposition import merge_expositions

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 2.0  # per front-end process, per question


class Member(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def http_port(self) -> int: ...
    @property
    def alive(self) -> bool: ...


class Supervised(Protocol):
    @property
    def members(self) -> Sequence[Member]: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def restarts(self) -> list[int]: ...


class FanOutHealth(HttpServer):
    def __init__(self, supervisor: Supervised, host: str, port: int) -> None:
        super().__init__(host, port)
        self._supervisor = supervisor
        self._registry = CollectorRegistry()
        restarts = Gauge(
            "warmserve_frontend_restarts",
            "Times each front-end process has been restarted by the supervisor",
            ["frontend"],
            registry=self._registry,
        )
        alive = Gauge(
            "warmserve_frontend_alive",
            "1 while the front-end process runs",
            ["frontend"],
            registry=self._registry,
        )
        for i in range(len(supervisor.restarts)):
            restarts.labels(str(i)).set_function(functools.partial(self._restarts, i))
            alive.labels(str(i)).set_function(functools.partial(self._alive, i))

    def _restarts(self, index: int) -> float:
        return float(self._supervisor.restarts[index])

    def _alive(self, index: int) -> float:
        return float(any(m.alive for m in self._supervisor.members if m.index == index))

    async def answer(self, method: str, path: str) -> Answer:
        route = path.split("?", 1)[0]
        parts = [p for p in route.split("/") if p]
        if route == "/metrics":
            return 200, await self._metrics()
        if parts == ["v2", "health", "live"]:
            return 200, {"live": True}
        if parts == ["v2", "health", "ready"] or (
            len(parts) in (4, 6) and parts[:2] == ["v2", "models"] and parts[-1] == "ready"
        ):
            return await self._ready(path)
        if len(parts) == 4 and parts[:2] == ["warmserve", "models"] and parts[3] == "latency":
            replies = await self._ask_all(path)
            if all(code == 404 for code, _ in replies):
                return 404, replies[0][1]
            return 200, {"name": parts[2], "frontends": [body for _, body in replies]}
        return 404, {"error": f"no route {path}"}

    async def _ready(self, path: str) -> Answer:
        replies = await self._ask_all(path)
        if all(code == 404 for code, _ in replies):
            return 404, replies[0][1]
        each = [code == 200 for code, _ in replies]
        ready = all(each) and not self._supervisor.stopping
        return (200 if ready else 503), {"ready": ready, "frontends_ready": each}

    async def _metrics(self) -> bytes:
        members = list(self._supervisor.members)
        replies = await asyncio.gather(*(_get(m.http_port, "/metrics") for m in members))
        texts = {
            str(m.index): body.decode()
            for m, (code, body) in zip(members, replies, strict=True)
            if code == 200
        }
        return merge_expositions(texts, "frontend") + generate_latest(self._registry)

    async def _ask_all(self, path: str) -> list[tuple[int, dict[str, object]]]:
        members = list(self._supervisor.members)
        replies = await asyncio.gather(*(_get(m.http_port, path) for m in members))
        answers: list[tuple[int, dict[str, object]]] = []
        for member, (code, body) in zip(members, replies, strict=True):
            try:
                decoded = json.loads(body) if body else {}
            except ValueError:
                decoded = {}
            answers.append((code, {"frontend": member.index, **decoded}))
        return answers


async def _get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` from a front-end process's private port: (status, body); 503 when it does
    not answer (starting, restarting, or stuck)."""
    if port < 0:
        return 503, b'{"error": "front-end process is starting"}'
    try:
        async with asyncio.timeout(ASK_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                await writer.drain()
                reply = await reader.read()  # the process closes after one answer
            finally:
                writer.close()
        head, _, body = reply.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body
    except (OSError, TimeoutError, ValueError, IndexError) as exc:
        log.warning("front-end process on port %d did not answer %s: %r", port, path, exc)
        return 503, b'{"error": "front-end process did not answer"}'
