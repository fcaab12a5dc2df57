"""A draining relay's view of its own sockets (serve/frontend/listener.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import grpc
import pytest

from serve.frontend import listener
from serve.frontend.listener import (
    busy_connections,
    close_listeners,
    connection_age_options,
    drain,
    open_connections,
    queued_connections_move,
    quiet_for_s,
)


def _listener(port: int = 0) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    server.bind(("127.0.0.1", port))
    server.listen(16)
    return server


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


@contextlib.contextmanager
def _one_client() -> Iterator[tuple[int, socket.socket]]:
    """A listener with one client connected: its port and the server's end."""
    server = _listener()
    port = server.getsockname()[1]
    client = _connect(port)
    accepted, _ = server.accept()
    try:
        yield port, accepted
    finally:
        for sock in (client, accepted, server):
            sock.close()


def test_a_listener_on_the_port_is_shut_and_others_are_not():
    ours, other = _listener(), _listener()
    port, other_port = ours.getsockname()[1], other.getsockname()[1]
    try:
        assert close_listeners(port) == 1
        with pytest.raises(ConnectionRefusedError):
            _connect(port)
        with _connect(other_port):  # another port's listener still takes connections
            pass
        assert close_listeners(port) == 0  # nothing listens there any more
    finally:
        ours.close()
        other.close()


def test_connections_already_accepted_outlive_the_listener():
    server = _listener()
    port = server.getsockname()[1]
    client = _connect(port)
    accepted, _ = server.accept()
    try:
        close_listeners(port)
        client.sendall(b"ping")
        assert accepted.recv(4) == b"ping"
        accepted.sendall(b"pong")
        assert client.recv(4) == b"pong"
    finally:
        for sock in (client, accepted, server):
            sock.close()


def test_connections_are_counted_at_the_servers_end_only():
    server = _listener()
    port = server.getsockname()[1]
    assert open_connections(port) == 0
    clients = [_connect(port) for _ in range(3)]
    accepted = [server.accept()[0] for _ in clients]
    try:
        assert open_connections(port) == 3  # the clients' ends (other local ports) not counted
        accepted[0].close()
        assert open_connections(port) == 2
    finally:
        for sock in [*clients, *accepted, server]:
            sock.close()
    assert open_connections(port) == 0


def test_a_grpc_aio_server_stops_taking_connections_and_serves_the_ones_it_has():
    async def scenario() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])

        async def echo(request: bytes, context: object) -> bytes:
            return request

        handler = grpc.method_handlers_generic_handler(
            "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        old = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        new = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("t.new", 1)])
        try:
            assert await old.unary_unary("/t.T/Echo")(b"a", timeout=10) == b"a"
            assert open_connections(port) == 1
            assert close_listeners(port) >= 1
            assert await old.unary_unary("/t.T/Echo")(b"b", timeout=10) == b"b"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await new.unary_unary("/t.T/Echo")(b"c", timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert open_connections(port) == 1
        finally:
            await old.close()
            await new.close()
            await server.stop(0)

    asyncio.run(scenario())


def test_a_drain_ends_when_the_last_connection_goes(caplog):
    caplog.set_level(logging.INFO, "serve.frontend.listener")
    server = _listener()
    port = server.getsockname()[1]
    client = _connect(port)
    accepted, _ = server.accept()

    async def scenario() -> None:
        draining = asyncio.create_task(drain("relay 7", port, limit_s=60))
        while "draining: stopped listening" not in caplog.text:
            await asyncio.sleep(0.01)
        accepted.close()  # (as gRPC closes a connection once its GOAWAY is done)
        async with asyncio.timeout(30):
            await draining

    try:
        asyncio.run(scenario())
    finally:
        client.close()
        server.close()
    assert "relay 7 draining: stopped listening (1 socket: gRPC logs a failed" in caplog.text
    assert "for its 1 connection to move" in caplog.text
    assert "relay 7 drained in" in caplog.text


def test_a_drain_gives_up_on_a_connection_that_stays_past_its_limit(caplog):
    with _one_client() as (port, _):
        asyncio.run(drain("relay 7", port, limit_s=0.3))
        assert open_connections(port) == 1  # (left to the stop that follows)
    assert "relay 7: 1 connection still open after 0.3 s of draining" in caplog.text


def test_a_connection_is_busy_while_it_received_data_within_the_quiet_time():
    server = _listener()
    port = server.getsockname()[1]
    talker, silent = _connect(port), _connect(port)
    accepted = [server.accept()[0] for _ in range(2)]
    try:
        talker.sendall(b"call")
        assert accepted[0].recv(4) == b"call"
        assert quiet_for_s(accepted[0].fileno()) < 3600
        # the kernel counts in milliseconds: a day's quiet time takes in both, none has a 0 s one
        assert busy_connections(port, quiet_s=86400) == 2
        assert busy_connections(port, quiet_s=0) == 0
        accepted[1].close()  # gone: neither busy nor counted
        assert busy_connections(port, quiet_s=86400) == 1
    finally:
        for sock in (talker, silent, *accepted, server):
            sock.close()
    assert quiet_for_s(accepted[0].fileno()) is None  # (closed: nothing to read)


def test_a_quiet_drain_ends_once_no_connection_is_busy_though_connections_stay(caplog):
    caplog.set_level(logging.INFO, "serve.frontend.listener")
    with _one_client() as (port, _), pytest.MonkeyPatch.context() as patch:
        patch.setattr(listener, "QUIET_S", 0.0)  # (every connection counts as quiet)
        assert asyncio.run(drain("the gRPC port", port, limit_s=60, quiet=True)) is True
        assert open_connections(port) == 1  # (an idle client: the stop's GOAWAY moves it)
    assert "for its 0 busy connections to move" in caplog.text
    assert "the gRPC port drained in" in caplog.text


def test_a_quiet_drain_gives_up_on_a_client_that_stays_busy_past_its_limit(caplog):
    with _one_client() as (port, _), pytest.MonkeyPatch.context() as patch:
        patch.setattr(listener, "QUIET_S", 86400.0)  # (every connection counts as busy)
        assert asyncio.run(drain("the gRPC port", port, limit_s=0.3, quiet=True)) is False
    assert "the gRPC port: 1 busy connection still open after 0.3 s of draining" in caplog.text


def test_connection_age_becomes_grpcs_option_in_milliseconds_and_zero_means_none():
    assert connection_age_options(0) == []
    assert connection_age_options(10) == [("grpc.max_connection_age_ms", 10000)]
    assert connection_age_options(1.5) == [("grpc.max_connection_age_ms", 1500)]


def test_the_kernels_choice_for_a_closed_listeners_queue_is_read_from_its_setting(tmp_path):
    setting = tmp_path / "tcp_migrate_req"
    setting.write_text("0\n")
    assert queued_connections_move(str(setting)) is False
    setting.write_text("1\n")
    assert queued_connections_move(str(setting)) is True
    assert queued_connections_move(str(tmp_path / "absent")) is None  # (an older kernel)
