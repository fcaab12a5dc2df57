"""The supervisor's HTTP answers combine its front-end processes' answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from serve.frontend.fanout import FanOutHealth
from serve.frontend.http_health import Answer, HttpServer


class FixedAnswers(HttpServer):
    def __init__(self, ready: bool) -> None:
        super().__init__("127.0.0.1", 0)
        self.ready = ready

    async def answer(self, method: str, path: str) -> Answer:
        if path == "/v2/health/ready":
            return (200 if self.ready else 503), {"ready": self.ready}
        return 404, {"error": f"no route {path}"}


@dataclass
class FakeMember:
    index: int
    http_port: int
    alive: bool = True


@dataclass
class FakeSupervisor:
    members: list[FakeMember]
    stopping: bool = False
    restarts: list[int] = field(default_factory=lambda: [0, 0])


def answers(ready: tuple[bool, bool], starting: bool = False) -> list[Answer]:
    async def scenario() -> list[Answer]:
        servers = [FixedAnswers(r) for r in ready]
        for server in servers:
            await server.start()
        members = [FakeMember(i, s.port) for i, s in enumerate(servers)]
        if starting:
            members[1].http_port = -1  # not reported yet
        supervisor = FakeSupervisor(members)
        fanout = FanOutHealth(supervisor, "127.0.0.1", 0)
        try:
            result = [
                await fanout.answer("GET", "/v2/health/ready"),
                await fanout.answer("GET", "/v2/models/nope/ready"),
            ]
            supervisor.stopping = True
            result.append(await fanout.answer("GET", "/v2/health/ready"))
            return result
        finally:
            for server in servers:
                await server.stop()

    return asyncio.run(scenario())


def test_ready_only_when_every_frontend_is_ready_and_not_stopping():
    ready, unknown, stopping = answers((True, True))
    assert ready == (200, {"ready": True, "frontends_ready": [True, True]})
    assert unknown[0] == 404
    assert stopping == (503, {"ready": False, "frontends_ready": [True, True]})


def test_one_frontend_not_ready_or_not_started_makes_the_server_not_ready():
    assert answers((True, False))[0] == (503, {"ready": False, "frontends_ready": [True, False]})
    assert answers((True, True), starting=True)[0][1]["frontends_ready"] == [True, False]
