"""Waking an event loop at an exact time, for the open loop's scheduled arrivals.

The loop's own timers are too coarse for an arrival process. uvloop's (libuv's) count whole
milliseconds from a time cached once per loop pass, and asyncio's default loop rounds its epoll
timeout up to the next millisecond. An open loop that sleeps on them sends each call 0-2 ms
after its scheduled arrival, at any rate, even with the machine idle (1.4 ms at p99 on the
dev VM). Latency counts from the scheduled arrival (no coordinated omission), so that lag was
charged to the server: a server that answers in 1 ms looked twice as slow in the open loop as
in the closed loop.

``ArrivalClock`` arms a Linux timerfd at the arrival's absolute CLOCK_MONOTONIC time (the clock
``time.perf_counter`` reads on Linux) and waits for it with the loop's reader callback, so the
loop wakes within the kernel's timer slack (50 µs by default) of the arrival. Where timerfd or
that clock is not there, it falls back to the loop's timer (``precise`` is then False).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import sys
import time

log = logging.getLogger(__name__)

CLOCK_MONOTONIC = 1
TFD_TIMER_ABSTIME = 1
NS = 1_000_000_000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    """libc with timerfd_create and timerfd_settime, on Linux with perf_counter on
    CLOCK_MONOTONIC; None otherwise."""
    if not sys.platform.startswith("linux"):
        return None
    if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settime.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(_Itimerspec),
        ctypes.POINTER(_Itimerspec),
    ]
    settime.restype = ctypes.c_int
    return libc


class ArrivalClock:
    """``await clock.until(t)``: returns once ``time.perf_counter()`` has reached ``t`` (never
    before it). Use as a context manager, inside the loop that waits on it; one waiter at a
    time."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = -1
        self._waiter: asyncio.Future[None] | None = None
        libc = _libc()
        if libc is not None:
            fd = libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                log.warning(
                    "timerfd_create failed (%s): arrivals fall back to the event loop's timer, "
                    "about 1 ms coarse",
                    os.strerror(ctypes.get_errno()),
                )
            else:
                self._fd = fd
                self._settime = libc.timerfd_settime
                self._loop.add_reader(fd, self._fired)

    @property
    def precise(self) -> bool:
        return self._fd >= 0

    def __enter__(self) -> ArrivalClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()

    async def until(self, when: float) -> None:
        """Wait until ``time.perf_counter()`` reaches ``when``."""
        while True:
            delay = when - time.perf_counter()
            if delay <= 0:
                return
            if self._fd < 0:
                await asyncio.sleep(delay)
                continue  # (the loop's timer may wake a little early: wait the rest)
            if self._waiter is not None:
                raise RuntimeError("ArrivalClock.until: one waiter at a time")
            ns = max(1, round(when * NS))  # (a zero time would disarm the timer)
            spec = _Itimerspec(_Timespec(0, 0), _Timespec(ns // NS, ns % NS))
            self._waiter = self._loop.create_future()
            try:
                if self._settime(self._fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"timerfd_settime: {os.strerror(code)}")
                await self._waiter
            finally:
                self._waiter = None

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)  # (the expiry count; reading rearms the fd's readiness)
        except BlockingIOError:  # (os.read retries EINTR itself, PEP 475)
            return  # (a timer re-armed since it became readable: not expired yet)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
