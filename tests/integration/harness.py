"""Start a real warmserve server (with real worker processes) on 127.0.0.1 for a test."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

POLL_S = 0.05


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this test run: the kernel may give the same
    free port to two calls in a row (a server's gRPC and HTTP ports, which then shared it)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_S)


class CallerThreads:
    """Closed-loop caller threads, bounded in count, stopped on leaving the ``with`` block.

    Subclasses implement ``call(client, seed, n)``: one call that records what it needs and
    raises on failure; failures are collected in ``errors``.
    """

    def __init__(self, url: str, threads: int, max_calls: int = 20000) -> None:
        self.errors: list[str] = []
        self.done = 0
        self._url = url
        self._max = max_calls
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self):  # type: ignore[no-untyped-def]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def call(self, client: triton.InferenceServerClient, seed: int, n: int) -> None:
        raise NotImplementedError

    def _run(self, seed: int) -> None:
        client = triton.InferenceServerClient(self._url)
        n = 0
        while not self._stop.is_set() and self.done < self._max:
            n += 1
            try:
                self.call(client, seed, n)
            except Exception as exc:
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            with self._lock:
                self.done += 1

    def wait_for(self, calls: int) -> None:
        target = self.done + calls
        wait_until(lambda: self.done >= target or self._stop.is_set(), 120, f"{calls} more calls")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def live_children() -> dict[int, list[int]]:
    """Parent pid → live child pids, for every process (from /proc; zombies left out)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


class ServerProcess:
    def __init__(
        self,
        log_path: Path,
        repository: Path | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """``cwd``: where the server runs, which is also where ``python -m serve`` imports the
        package from (another checkout of it, for an A/B). ``host``: a loopback address."""
        self.port = free_port()
        self.http_port = free_port()
        self.host = host
        self.url = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "serve", "serve", "--host", host]
        command += ["--grpc-port", str(self.port), "--http-port", str(self.http_port), *args]
        if repository is not None:
            command += ["--repository", str(repository)]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.client = triton.InferenceServerClient(self.url)

    def _answers(self, check: Callable[[], object]) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
        try:
            return bool(check())
        except triton.InferenceServerException:
            return False

    def wait_live(self, timeout: float = 60) -> None:
        wait_until(lambda: self._answers(self.client.is_server_live), timeout, "server live")

    def wait_ready(self, timeout: float = 120) -> None:
        wait_until(lambda: self._answers(self.client.is_server_ready), timeout, "server ready")

    def ready_over_http(self) -> bool:
        """GET /v2/health/ready answers 200 (False while the port does not answer yet)."""
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
        try:
            return self.http_get("/v2/health/ready") == 200
        except OSError:
            return False

    def wait_for_log(self, pattern: str, timeout: float = 30) -> None:
        regex = re.compile(pattern)
        wait_until(lambda: regex.search(self.log()) is not None, timeout, f"log line {pattern!r}")

    def count_log(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def wait_for_log_count(self, pattern: str, count: int, timeout: float = 30) -> None:
        wait_until(lambda: self.count_log(pattern) >= count, timeout, f"{count}× {pattern!r}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _children(self) -> dict[int, list[int]]:
        return live_children()

    def template_pids(self) -> list[int]:
        """The worker templates: the server's children that fork workers."""
        return sorted(
            pid
            for pid in self._children().get(self.process.pid, [])
            if b"serve.worker.template" in _cmdline(pid)
        )

    def worker_pids(self) -> list[int]:
        """Live worker processes: forked from a template, or spawned by the server itself."""
        children = self._children()
        templates = set(self.template_pids())
        workers = [  # spawned ones run serve.worker; relays and helpers do not
            p
            for p in children.get(self.process.pid, [])
            if p not in templates and b"serve.worker" in _cmdline(p)
        ]
        for template in templates:
            workers += children.get(template, [])
        return sorted(workers)

    def http_get(self, path: str) -> int:
        """The status code of GET ``path`` on the HTTP health port."""
        return self.http_json(path)[0]

    def http_json(self, path: str) -> tuple[int, dict[str, Any]]:
        status, body = self.http_text(path)
        return status, json.loads(body or "{}")

    def http_text(self, path: str) -> tuple[int, str]:
        connection = http.client.HTTPConnection(self.host, self.http_port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def metric_total(self, name: str) -> float:
        """The sum of a metric's samples over every label set, from /metrics (e.g. relay calls
        through the rings: ``warmserve_relay_ring_calls_total``)."""
        status, text = self.http_text("/metrics")
        assert status == 200, status
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        )

    def health(self, service: str = "", url: str | None = None) -> str:
        """The gRPC health status name of ``service`` (``NOT_FOUND`` for an unknown one)."""
        with grpc.insecure_channel(url or self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            except grpc.RpcError as exc:
                return str(exc.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def mapped_files(self) -> str:
        return Path(f"/proc/{self.process.pid}/maps").read_text()

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> int:
        # (the harness's own connection first: a server stops once no client is busy on it)
        self.client.close()
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return int(self.process.returncode)
