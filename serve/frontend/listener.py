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
import struct
import time

log = logging.getLogger(__name__)

ESTABLISHED = "01"  # the state column of /proc/net/tcp{,6}
TCP_TABLES = ("/proc/self/net/tcp", "/proc/self/net/tcp6")
DRAIN_POLL_S = 0.2  # how often a draining process counts its connections
MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"  # (Linux 5.14+, per network namespace)
# A connection that has received nothing for this long is quiet: a client between calls that
# far apart is not sending one, so a stop that sends it a GOAWAY now cancels nothing of its.
QUIET_S = 1.0
# struct tcp_info (linux/tcp.h): its fixed head is 104 bytes since Linux 4.x; the u32 at 52 is
# tcpi_last_data_recv, milliseconds since the connection last received data.
TCP_INFO_BYTES = 104
LAST_DATA_RECV_AT = 52


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


def _connections(port: int) -> list[int]:
    """A file descriptor for each established TCP connection this process holds whose own end
    is ``port``: the clients connected to a server of this process listening there."""
    ours = _sockets()
    found: list[int] = []
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
                        found.append(ours[int(fields[9])])
        except FileNotFoundError:  # (no IPv6 in this kernel)
            continue
    return found


def open_connections(port: int) -> int:
    """How many established TCP connections this process holds whose own end is ``port``."""
    return len(_connections(port))


def quiet_for_s(fd: int) -> float | None:
    """Seconds since TCP connection ``fd`` last received data (the kernel's TCP_INFO); None if
    it cannot be read (closed meanwhile)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as conn:
            info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
    except OSError:
        return None
    if len(info) < LAST_DATA_RECV_AT + 4:
        return 0.0  # (cannot tell: counted as busy)
    ms: int = struct.unpack_from("=I", info, LAST_DATA_RECV_AT)[0]
    return ms / 1000


def busy_connections(port: int, quiet_s: float) -> int:
    """How many of this process's connections on ``port`` received data in the last
    ``quiet_s``: clients that may be sending a call."""
    busy = 0
    for fd in _connections(port):
        quiet = quiet_for_s(fd)
        if quiet is not None and quiet < quiet_s:
            busy += 1
    return busy


async def drain(name: str, port: int, limit_s: float, quiet: bool = False) -> bool:
    """Stop listening on ``port``, then wait (at most ``limit_s``) for this process's connections
    there to go: each gets its GOAWAY at its age (connection_age_options), and its client
    reconnects elsewhere (another process on the port, another pod). The graceful stop that
    follows then finds no client that could still send it a call: gRPC's stop cancels the calls
    that arrive in its first instant (grpc/grpc#41785), and a reconnect that met the closing
    port waited out the client's one-second backoff. ``quiet``: the wait ends as soon as no
    connection has received anything for QUIET_S (idle clients lose nothing to a stop's GOAWAY);
    otherwise only once every connection has gone. Whether the wait ended before its limit."""
    closed = close_listeners(port)  # (0 when an earlier drain closed it)

    def count(port: int) -> int:
        return busy_connections(port, QUIET_S) if quiet else open_connections(port)

    what = "busy connection" if quiet else "connection"
    connections = count(port)
    log.info(
        "%s draining: stopped listening (%d socket%s%s); waiting up to %.3g s for its %d "
        "%s%s to move away",
        name,
        closed,
        "" if closed == 1 else "s",
        ": gRPC logs a failed accept4 for it, as expected" if closed else "",
        limit_s,
        connections,
        what,
        "" if connections == 1 else "s",
    )
    started = time.monotonic()
    while connections and time.monotonic() - started < limit_s:
        await asyncio.sleep(DRAIN_POLL_S)  # (the kernel tells no one when a connection closes)
        connections = count(port)
    if connections:
        log.warning(
            "%s: %d %s%s still open after %.3g s of draining (%s); stopping, which ends its calls",
            name,
            connections,
            what,
            "" if connections == 1 else "s",
            limit_s,
            "younger than max_connection_age_s, a stream, or a client that does not follow "
            "GOAWAY: an age no longer than the drain delay moves every client first"
            if quiet
            else "a stream, or a client that does not follow GOAWAY",
        )
        return False
    log.info("%s drained in %.1f s", name, time.monotonic() - started)
    return True


def connection_age_options(age_s: float) -> list[tuple[str, int]]:
    """gRPC server options that send a GOAWAY to each connection after ``age_s`` (0: never;
    gRPC adds up to 10 % either way). Calls already on the connection finish there, however
    long (a ModelStreamInfer stream too); the client takes new calls to a new connection."""
    if age_s <= 0:
        return []
    return [("grpc.max_connection_age_ms", max(1, round(age_s * 1000)))]
