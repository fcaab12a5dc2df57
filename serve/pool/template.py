"""The parent's side of the worker template (see serve/worker/template.py).

``WorkerTemplate.fork()`` hands the template a new worker's descriptors and gets its pid back;
``ForkedProcess`` watches that worker through a pidfd (it is the template's child, not ours) and
offers the part of asyncio's Process that WorkerHandle uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from serve.pool.messages import FORK_PID

log = logging.getLogger(__name__)

FORK_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
PRELOAD = {"torch": ("torch",), "onnx": ("onnxruntime",)}


class TemplateError(RuntimeError):
    """The template could not start or fork; the pool spawns workers directly instead."""


class ForkedProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = loop.create_future()
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = -1
            self._mark_exited()
            return
        loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._mark_exited()

    def _mark_exited(self) -> None:
        self.returncode = -1  # reaped by the template: the status is not ours to read
        if not self._exited.done():
            self._exited.set_result(None)

    async def wait(self) -> int:
        await self._exited
        return -1

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class WorkerTemplate:
    def __init__(self, backend: str, name: str, startup_timeout_s: float) -> None:
        self._preload = PRELOAD.get(backend, ())
        self._name = name
        self._startup_timeout_s = startup_timeout_s
        self._sock: socket.socket | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return (
            self._sock is not None
            and self._process is not None
            and self._process.returncode is None
        )

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "serve.worker.template",
                "--fd",
                str(theirs.fileno()),
                "--preload",
                *self._preload,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        try:
            async with asyncio.timeout(self._startup_timeout_s):
                ready = await asyncio.get_running_loop().sock_recv(ours, 1)
        except TimeoutError:
            ready = b""
        if ready != b"R":
            await self.stop()
            raise TemplateError(f"worker template for {self._name} did not start")
        log.info(
            "worker template for %s ready (pid %d, preloaded %s)",
            self._name,
            self._process.pid,
            ", ".join(self._preload) or "nothing",
        )

    async def fork(self, channel_fd: int, in_fd: int, out_fd: int, log_level: str) -> ForkedProcess:
        """Fork a worker that serves over ``channel_fd`` with the two arenas."""
        if not self.alive or self._sock is None:
            raise TemplateError("the worker template is not running")
        loop = asyncio.get_running_loop()
        async with self._lock:
            sock = self._sock
            if sock is None:  # a fork before ours (we waited for it) gave the template up
                raise TemplateError("the worker template is not running")
            try:
                async with asyncio.timeout(FORK_TIMEOUT_S):
                    socket.send_fds(sock, [log_level.encode()], [channel_fd, in_fd, out_fd])
                    reply = b""
                    while len(reply) < FORK_PID.size:
                        chunk = await loop.sock_recv(sock, FORK_PID.size - len(reply))
                        if not chunk:
                            raise TemplateError("the worker template closed its socket")
                        reply += chunk
            except BaseException as exc:
                # Out of step from here on (a late reply would be read as the next fork's pid):
                # close the socket, which ends the template, and kill it in case it hangs (its
                # workers outlive it); workers are spawned from now on.
                sock.close()
                self._sock = None
                if self._process is not None and self._process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self._process.kill()
                reason = (  # (a hung template: a TimeoutError's str() is empty)
                    f"no answer within {FORK_TIMEOUT_S:g} s"
                    if isinstance(exc, TimeoutError)
                    else str(exc) or type(exc).__name__
                )
                if isinstance(exc, asyncio.CancelledError):  # (its pool stops: on purpose)
                    log.info(
                        "worker template for %s closed: a fork request was cancelled", self._name
                    )
                else:
                    log.warning(
                        "worker template for %s given up: fork request failed: %s",
                        self._name,
                        reason,
                    )
                if isinstance(exc, OSError | TimeoutError):
                    raise TemplateError(f"fork request failed: {reason}") from exc
                raise
        (pid,) = FORK_PID.unpack(reply)
        if pid <= 0:
            raise TemplateError("the worker template could not fork")
        return ForkedProcess(pid)

    async def stop(self) -> None:
        """Close the socket (the template exits on it); kill it if it lingers."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None and self._process.returncode is None:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await self._process.wait()
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
