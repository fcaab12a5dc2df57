"""This process's listening socket and client connections on a TCP port, found through /proc.

grpc.aio gives no handle on the sockets it listens and serves on. A relay that drains needs both:
it takes its listening socket out of the port's SO_REUSEPORT group, so that the kernel hands new
connections to the other relays while it goes on serving the connections it has, and it watches
those connections leave. Linux only (as SO_REUSEPORT's spreading of connections is).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import time

log = logging.getLogger(__name__)

ESTABLISHED = "01"  # the state column of /proc/net/tcp{,6}
TCP_TABLES = ("/proc/self/net/tcp", "/proc/self/net/tcp6")
DRAIN_POLL_S = 0.2  # how often a draining process counts its connections
MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"  # (Linux 5.14+, per network namespace)


def _sockets() -> dict[int, int]:
    """This process's socket file descriptors by inode (one fd per socket)."""
    found: dict[int, int] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            status = os.fstat(fd)
        except (ValueError, OSError):  # (the listing's own fd, closed since)
            continue
        if stat.S_ISSOCK(status.st_mode):
            found.setdefault(status.st_ino, fd)
    return found


def close_listeners(port: int) -> int:
    """Shut down every TCP socket of this process that listens on ``port``; how many. The kernel
    takes each out of the port's SO_REUSEPORT group at once; connections already accepted from
    it are untouched. (gRPC then logs once that its accept4 failed with EINVAL, and stops
    watching the socket.)"""
    closed = 0
    for fd in _sockets().values():
        try:
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:  # (closed since it was listed)
            continue
        with probe:
            try:
                if (
                    probe.family not in (socket.AF_INET, socket.AF_INET6)
                    or probe.type != socket.SOCK_STREAM
                    or not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    or probe.getsockname()[1] != port
                ):
                    continue
                probe.shutdown(socket.SHUT_RDWR)
                closed += 1
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:  # (ENOTCONN: it stopped listening meanwhile)
                    log.warning("cannot stop listening on port %d (fd %d): %s", port, fd, exc)
    return closed


def queued_connections_move(path: str = MIGRATE_REQ) -> bool | None:
    """Whether the kernel hands the connections waiting in the queue of a listening socket that
    closes to another listener of its SO_REUSEPORT group (net.ipv4.tcp_migrate_req = 1) rather
    than resetting them; None where it cannot tell."""
    try:
        with open(path, encoding="ascii") as setting:
            return setting.read().strip() != "0"
    except OSError:
        return None


def open_connections(port: int) -> int:
    """How many established TCP connections this process holds whose own end is ``port``: the
    clients connected to a server of this process listening there."""
    ours = _sockets()
    count = 0
    for table in TCP_TABLES:
        try:
            with open(table, encoding="ascii") as rows:
                next(rows, None)  # the header
                for row in rows:
                    fields = row.split()
                    # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                    if (
                        len(fields) > 9
                        and fields[3] == ESTABLISHED
                        and int(fields[1].rsplit(":", 1)[1], 16) == port
                        and int(fields[9]) in ours
                    ):
                        count += 1
        except FileNotFoundError:  # (no IPv6 in this kernel)
            continue
    return count


async def drain(name: str, port: int, limit_s: float) -> None:
    """Stop listening on ``port``, then wait (at most ``limit_s``) for this process's connections
    there to go: each gets its GOAWAY at its age (relay.connection_age_options), and its client
    reconnects to another process on the port. The graceful stop that follows then finds no
    client that could still send it a call: gRPC's stop cancels the calls that arrive in its
    first instant (grpc/grpc#41785), and a reconnect that met the closing port waited out the
    client's one-second backoff."""
    log.info(
        "%s draining: closing its listening socket (gRPC logs a failed accept4: expected)", name
    )
    closed = close_listeners(port)
    connections = open_connections(port)
    log.info(
        "%s draining: stopped listening (%d socket%s); waiting up to %.3g s for its %d "
        "connection%s to move to the others on the port",
        name,
        closed,
        "" if closed == 1 else "s",
        limit_s,
        connections,
        "" if connections == 1 else "s",
    )
    started = time.monotonic()
    while connections and time.monotonic() - started < limit_s:
        await asyncio.sleep(DRAIN_POLL_S)  # (the kernel tells no one when a connection closes)
        connections = open_connections(port)
    if connections:
        log.warning(
            "%s: %d connection%s still open after %.3g s of draining (a stream, or a client "
            "that does not follow GOAWAY); stopping, which ends its calls",
            name,
            connections,
            "" if connections == 1 else "s",
            limit_s,
        )
    else:
        log.info("%s drained in %.1f s", name, time.monotonic() - started)
