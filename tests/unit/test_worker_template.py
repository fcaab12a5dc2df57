"""The worker template's fork requests (a stand-in template on a socketpair, no process)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

import serve.pool.template
from serve.pool.template import TemplateError, WorkerTemplate


class _Running:
    returncode = None
    killed = False

    def kill(self) -> None:
        self.killed = True


def _silent_template() -> tuple[WorkerTemplate, socket.socket, list[int]]:
    """A template whose process never answers (its socket's far end, returned), and three
    descriptors to pass it (the caller closes them)."""
    template = WorkerTemplate("onnx", "m", 5.0)
    ours, silent = socket.socketpair()
    ours.setblocking(False)
    template._sock, template._process = ours, _Running()  # type: ignore[assignment]
    return template, silent, [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]


def test_a_fork_request_that_times_out_retires_the_template(monkeypatch):
    monkeypatch.setattr(serve.pool.template, "FORK_TIMEOUT_S", 0.05)

    async def main() -> tuple[WorkerTemplate, bytes]:
        template, silent, fds = _silent_template()
        try:
            with pytest.raises(TemplateError, match="fork request failed"):
                await template.fork(fds[0], fds[1], fds[2], "INFO")
        finally:
            for fd in fds:
                os.close(fd)
        silent.settimeout(1)
        request = silent.recv(64)  # it was asked...
        closed = silent.recv(64)  # ...and then let go: a late pid can never be misread
        silent.close()
        return template, request + b"|" + closed

    template, seen = asyncio.run(main())
    assert not template.alive  # the next worker is spawned instead
    assert template._process.killed  # type: ignore[union-attr]  # it may hang: not left behind
    assert seen.startswith(b"INFO") and seen.endswith(b"|")


def test_forks_waiting_behind_one_that_retires_the_template_fail_as_template_errors(monkeypatch):
    # Workers start together (a pool of several); their fork requests queue on the template's
    # lock. When the first gives the template up, the others must fail so that the pool spawns
    # them (TemplateError), not with an error that fails the worker's start.
    monkeypatch.setattr(serve.pool.template, "FORK_TIMEOUT_S", 0.05)

    async def main() -> list[BaseException]:
        template, silent, fds = _silent_template()
        try:
            outcomes = await asyncio.gather(
                *(template.fork(fds[0], fds[1], fds[2], "INFO") for _ in range(3)),
                return_exceptions=True,
            )
        finally:
            for fd in fds:
                os.close(fd)
            silent.close()
        return [o for o in outcomes if isinstance(o, BaseException)]

    errors = asyncio.run(main())
    assert len(errors) == 3
    assert all(isinstance(e, TemplateError) for e in errors), errors
    assert "fork request failed: no answer within 0.05 s" in str(errors[0])  # (the first one)


def test_a_cancelled_fork_request_closes_the_template_quietly(caplog):
    import logging

    caplog.set_level(logging.INFO, "serve.pool.template")

    async def main() -> WorkerTemplate:
        template, silent, fds = _silent_template()
        try:
            request = asyncio.create_task(template.fork(fds[0], fds[1], fds[2], "INFO"))
            await asyncio.sleep(0.01)  # (sent; waiting for the pid)
            request.cancel()  # its pool stops
            with pytest.raises(asyncio.CancelledError):
                await request
        finally:
            for fd in fds:
                os.close(fd)
            silent.close()
        return template

    template = asyncio.run(main())
    assert not template.alive  # out of step: a late pid must never be read as the next one's
    assert "worker template for m closed: a fork request was cancelled" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
