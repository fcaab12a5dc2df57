"""Settings gRPC reads once, when it is first imported: made here, before that happens.

gRPC's fork support (built into grpcio and on by default in its core) installs fork handlers
that pause and restart gRPC's own threads and poller around every fork() of the process. A
serving process forks while calls are in flight: it starts a worker template on every model
load, workers directly when there is no template, and relay processes, each by fork() and an
immediate exec(). Those children never use the parent's gRPC, so the handlers have nothing to
protect, and running them under live traffic is what can go wrong: a CI run of this project saw
one call stay unanswered until its 30 s deadline, begun at the instant a model load started its
worker template (gRPC logged "Other threads are currently calling into gRPC, skipping fork()
handlers" there); grpc/grpc#37259 reports hangs around subprocess.Popen in gRPC processes. gRPC's
own fork notes say to turn the handlers off, GRPC_ENABLE_FORK_SUPPORT=false, when every fork is
followed by exec, which is this server's case.

The variable only counts when set before ``import grpc``, so ``prepare()`` runs first thing in
the serving process; the relay processes it spawns inherit it with its environment.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

FORK_SUPPORT_VAR = "GRPC_ENABLE_FORK_SUPPORT"
_OFF = ("0", "false", "no", "n", "f")


def prepare() -> bool:
    """Turn gRPC's fork handlers off for this process and the processes it starts. False (with
    a warning) when gRPC was imported already, so the setting comes too late for this process."""
    previous = os.environ.get(FORK_SUPPORT_VAR)
    os.environ[FORK_SUPPORT_VAR] = "false"
    if "grpc" in sys.modules:
        log.warning(
            "gRPC was imported before its fork handlers could be turned off: a model load "
            "(which starts processes) may stall calls in flight; set %s=false in the "
            "environment to be sure",
            FORK_SUPPORT_VAR,
        )
        return False
    if previous is not None and previous.strip().lower() not in _OFF:
        log.info(
            "%s=%s ignored: this server starts its processes by fork and exec, which needs no "
            "fork handlers, and the handlers can stall calls in flight; running with false",
            FORK_SUPPORT_VAR,
            previous,
        )
    return True
