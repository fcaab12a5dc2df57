"""The worker template: ``python -m serve.worker.template --fd N --preload torch``.

A process spawned once per pool that imports the worker code and the model framework (never
touching CUDA), then forks a fresh worker for every request the pool sends. A new worker thus
skips the interpreter start and the framework import (MEASURED.md: ~3–10 s of a GPU worker's
cold start), and still starts from a process that has never initialised CUDA or loaded a model.

Protocol on the socket: the pool sends one byte with three descriptors attached (the worker's
channel and its two arenas) plus the log level; the template answers with the child's pid
(8 bytes, little-endian). Forked children are reaped by the kernel (SIGCHLD is
ignored); the pool watches each one through a pidfd and its channel.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import sys
import traceback

from serve.pool.messages import FORK_PID, FORK_REQUEST_BYTES


def _fork_worker(sock: socket.socket, fds: list[int], log_level: str) -> int:
    pid = os.fork()
    if pid == 0:  # the child: become a worker, never return into the template's loop
        code = 1
        try:
            sock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            from serve.worker.main import run

            code = run(fds[0], fds[1], fds[2], log_level)
        except BaseException:  # (SystemExit from a bundle's code, say): os._exit prints nothing
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    return pid


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.worker.template")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the pool")
    parser.add_argument("--preload", nargs="*", default=[], help="modules to import up front")
    args = parser.parse_args(argv)
    from serve.memory import freeze_long_lived, keep_large_buffers_in_heap
    from serve.worker.main import ignore_group_signals

    ignore_group_signals()
    keep_large_buffers_in_heap()  # forked workers inherit it
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps forked workers
    for module in ("numpy", "serve.backends.base", *args.preload):
        try:
            importlib.import_module(module)
        except ImportError as exc:  # the worker will report it properly when it loads
            print(f"worker template: cannot preload {module}: {exc}", file=sys.stderr)
    freeze_long_lived("worker template")  # (its children's collections leave these pages be)
    sock = socket.socket(fileno=args.fd)
    sock.sendall(b"R")
    while True:
        message, fds, _, _ = socket.recv_fds(sock, FORK_REQUEST_BYTES, 3)
        if not message:
            return 0  # the pool closed the socket
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            sock.sendall(FORK_PID.pack(-1))
            continue
        pid = _fork_worker(sock, fds, message.decode(errors="replace") or "INFO")
        sock.sendall(FORK_PID.pack(pid))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
