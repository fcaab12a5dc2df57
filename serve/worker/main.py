"""Worker process entry: ``python -m serve.worker --fd N``.

Receives Init on the inherited socket, maps the shared-memory arenas, loads the model, warms every
batch bucket, reports Ready, then loops: read a batch from shared memory → run → write outputs →
report. A per-batch error goes back to that batch; an error that leaves the process unusable
(a sticky CUDA error) is reported as Fatal and the process exits so the pool replaces it.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import select
import signal
import socket
import threading
import time
from typing import Any

import numpy as np

from serve.backends.base import is_out_of_memory
from serve.config import CUDA_IDLE_SPIN_US, ModelConfig
from serve.cpus import SpinPause, throttle_watch
from serve.errors import InvalidInputError
from serve.memory import freeze_long_lived, keep_large_buffers_in_heap
from serve.pool.arena import Arena
from serve.pool.messages import (
    FRAME_HEADER,
    IPC_VERSION,
    MAX_FRAME_BYTES,
    BatchDone,
    BatchFailed,
    Fatal,
    FromWorker,
    Init,
    Ready,
    RunBatch,
    Shutdown,
    frame,
    to_worker_decoder,
)
from serve.protocol.datatypes import Datatype, datatype_of, numpy_dtype

log = logging.getLogger("serve.worker")


class FatalBatchError(Exception):
    """A batch left the process unable to serve (e.g. a sticky CUDA error)."""

    def __init__(self, batch_id: int) -> None:
        super().__init__(f"batch {batch_id}")
        self.batch_id = batch_id


class ModelStartError(Exception):
    """The model failed to load or to warm up (its bundle, code, weights or device)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"the model failed to load or warm up: {type(cause).__name__}: {cause}")


class Channel:
    """Blocking framed messages over the socket shared with the parent.

    With ``spin_s`` > 0, a receive that finds nothing waiting first polls the socket without
    blocking for up to that long, and only then sleeps in ``recv``. A batch that arrives while
    the worker polls skips the kernel's wake-up of a sleeping process (tens of µs, more on hosts
    whose idle cores sleep deeply) at the price of a busy core for that long after each batch.
    It polls only while the last wait for a batch was no longer than ``spin_s``: under light
    load, when batches come further apart than that, polling would burn the core for nothing.

    ``pause``: whether the CPU limit stopped the process lately (serve/cpus.SpinPause): then the
    worker does not poll, since a poll spends the quota that the serving process and the other
    workers are short of, and the whole server would wait in the kernel for the next period
    instead of the worker in ``recv``.
    """

    def __init__(
        self, sock: socket.socket, spin_s: float = 0.0, pause: SpinPause | None = None
    ) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self.spin_s = spin_s
        self.pause = pause or SpinPause(None, "idle spin")
        self._last_wait = 0.0  # seconds the last receive waited for its first bytes

    def recv(self) -> Init | RunBatch | Shutdown:
        header = FRAME_HEADER.size
        while len(self._buffer) < header:
            self._fill()
        (length,) = FRAME_HEADER.unpack_from(self._buffer)
        if length > MAX_FRAME_BYTES:  # a corrupt stream: the worker cannot go on (exit 1)
            raise RuntimeError(f"corrupt channel: a frame of {length} bytes from the parent")
        end = header + length
        while len(self._buffer) < end:
            self._fill(mid_message=True)
        with memoryview(self._buffer) as view:
            message: Init | RunBatch | Shutdown = to_worker_decoder.decode(view[header:end])
        del self._buffer[:end]
        return message

    def _fill(self, mid_message: bool = False) -> None:
        if self.spin_s > 0 and not mid_message:
            started = time.perf_counter()
            if self._last_wait <= self.spin_s and not self.pause():
                self._spin()
            data = self._sock.recv(1 << 16)
            self._last_wait = time.perf_counter() - started
        else:
            data = self._sock.recv(1 << 16)
        if not data:
            raise EOFError(
                "parent closed the channel mid-message"
                if mid_message or self._buffer
                else "parent closed the channel"
            )
        self._buffer += data

    def _spin(self) -> None:
        """Poll until data (or the parent's close) is waiting, or ``spin_s`` has passed."""
        deadline = time.perf_counter() + self.spin_s
        flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
        while True:
            try:
                self._sock.recv(1, flags)
                return  # data, or b"" at the parent's close: the blocking recv returns at once
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    return

    def send(self, message: FromWorker) -> None:
        self._sock.sendall(frame(message))


def idle_spin_us(configured: float, device: str) -> float:
    """``pool.idle_spin_us`` for a worker on ``device``: -1 (auto) spins on CUDA devices only."""
    if configured >= 0:
        return configured
    return CUDA_IDLE_SPIN_US if device.startswith("cuda") else 0.0


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int:
    for size in buckets:
        if size >= rows:
            return size
    return rows


class Worker:
    def __init__(self, channel: Channel, init: Init, in_fd: int, out_fd: int) -> None:
        from serve.worker.loading import load_model

        self.channel = channel
        self.init = init
        self.model: ModelConfig = init.model
        self.inputs = Arena(in_fd, init.slots, init.slot_bytes)
        self.outputs = Arena(out_fd, init.slots, init.slot_bytes)
        start = time.monotonic()
        try:
            self.processing, self.backend = load_model(
                self.model, init.bundle_id, init.device, init.threads, init.require_gpu
            )
        except Exception as exc:
            raise ModelStartError(exc) from exc
        self.load_s = time.monotonic() - start
        fixed = init.fixed_shapes if init.fixed_shapes is not None else self.backend.fixed_shapes
        self.buckets = self.model.batch_buckets
        self.pad = fixed and bool(self.buckets)
        self.batched = self.model.max_batch_size > 0
        self.output_types = {s.name: Datatype(s.datatype) for s in self.model.outputs}
        self.output_dtypes = {name: numpy_dtype(t) for name, t in self.output_types.items()}
        self.output_dims = {s.name: tuple(s.shape) for s in self.model.outputs}  # batch dim not
        # Inputs are read in place from the arena: a backend with a device may page-lock it, so
        # a batch's rows go to the device by DMA straight from shared memory.
        if self.backend.pin_host_memory(*self.inputs.address_range()):
            log.info("input arena (%d bytes) page-locked for device copies", self.inputs.size)

    def warm_up(self) -> float:
        """Run every bucket the worker will serve; check outputs match the config."""
        from serve.backends.base import sample_inputs

        start = time.monotonic()
        try:
            for rows in self.buckets or (None,):
                inputs = self.processing.preprocess(sample_inputs(self.model, rows))
                self.backend.warm(inputs)
                self._check_outputs(self.processing.postprocess(self.backend.run(inputs)), rows)
                log.debug("warmed batch shape %s", rows)
        except Exception as exc:
            raise ModelStartError(exc) from exc
        return time.monotonic() - start

    def _check_outputs(
        self, outputs: dict[str, np.ndarray[Any, Any]], rows: int | None, padded: bool = False
    ) -> None:
        """Names, datatypes and shapes as configured and, given ``rows``, one row per batch row
        (at least that many when ``padded``: the padding rows are cut off after)."""
        for name, datatype in self.output_types.items():
            if name not in outputs:
                raise ValueError(f"model produced no output {name!r}")
            out = outputs[name]
            # (the common case without the full lookup)
            got = datatype if out.dtype == self.output_dtypes[name] else datatype_of(out)
            if got is not datatype:
                raise ValueError(f"output {name!r} is {got}, the model config says {datatype}")
            if rows is not None and (
                out.ndim == 0 or out.shape[0] < rows or (out.shape[0] != rows and not padded)
            ):
                raise ValueError(f"output {name!r} has shape {out.shape} for {rows} rows")
            dims, want = out.shape[1:] if self.batched else out.shape, self.output_dims[name]
            if len(dims) != len(want) or any(
                w not in (-1, d) for w, d in zip(want, dims, strict=True)
            ):
                config = [-1, *want] if self.batched else list(want)
                raise ValueError(
                    f"output {name!r} has shape {list(out.shape)}, the model config says {config}"
                )

    def serve_forever(self) -> None:
        while True:
            message = self.channel.recv()
            if isinstance(message, RunBatch):
                self.channel.send(self.run_batch(message))
            elif isinstance(message, Shutdown):
                log.info("shutting down (%s)", message.reason or "asked by the pool")
                return
            else:
                raise RuntimeError(f"unexpected {type(message).__name__} after Init")

    def run_batch(self, message: RunBatch) -> BatchDone | BatchFailed:
        t0 = time.perf_counter_ns()
        try:
            arrays = {
                ref.name: self.inputs.read(message.slot, ref, copy=False) for ref in message.inputs
            }
        except Exception as exc:
            return BatchFailed(message.batch_id, "invalid_input", f"cannot read inputs: {exc}")
        t1 = time.perf_counter_ns()
        out_of_memory: BatchFailed | None = None
        try:
            inputs = self.processing.preprocess(arrays)
            if self.pad:  # on the warmed shape of the smallest bucket that holds the batch
                result = self.backend.run_bucket(inputs, bucket_for(message.rows, self.buckets))
            else:
                result = self.backend.run(inputs)
            outputs = self.processing.postprocess(result)
            # A malformed answer (no row per batch row) fails this batch here, where the merged
            # batch's requests are run again one by one; cut below, it would end the worker.
            self._check_outputs(outputs, message.rows if self.batched else None, self.pad)
        except InvalidInputError as exc:  # the model's own code refused the data: the client's
            log.info("batch %d: invalid input: %s", message.batch_id, exc)
            return BatchFailed(message.batch_id, "invalid_input", str(exc))
        except Exception as exc:
            if is_out_of_memory(exc):  # (before is_fatal: "CUDA error: out of memory" is not)
                out_of_memory = self._out_of_memory(message, exc)
            elif self.backend.is_fatal(exc):
                raise FatalBatchError(message.batch_id) from exc
            else:
                log.warning("batch %d failed: %s: %s", message.batch_id, type(exc).__name__, exc)
                return BatchFailed(message.batch_id, "execution", f"{type(exc).__name__}: {exc}")
        if out_of_memory is not None:
            # Out of the except clause, the exception's frames (and the tensors they held) are
            # gone: what the framework caches of them can be given back now.
            try:
                self.backend.release_memory()
            except Exception as exc:  # the next batch tells whether the device is still usable
                log.warning("releasing cached memory failed: %s: %s", type(exc).__name__, exc)
            return out_of_memory
        t2 = time.perf_counter_ns()
        tensors = [
            (
                name,
                datatype,
                [outputs[name][: message.rows] if self.pad else outputs[name]],
            )
            for name, datatype in self.output_types.items()
        ]
        try:  # e.g. a BYTES output holding None: this batch's failure, not the worker's
            refs = self.outputs.write(message.slot, tensors)
        except Exception as exc:
            log.warning(
                "batch %d: cannot write its outputs: %s: %s",
                message.batch_id,
                type(exc).__name__,
                exc,
            )
            detail = f"cannot write the outputs: {type(exc).__name__}: {exc}"
            return BatchFailed(message.batch_id, "execution", detail)
        t3 = time.perf_counter_ns()
        return BatchDone(message.batch_id, refs, t1 - t0, t2 - t1, t3 - t2)

    def _out_of_memory(self, message: RunBatch, exc: Exception) -> BatchFailed:
        """A batch needed more memory than its device (or the host) had: that batch fails
        (RESOURCE_EXHAUSTED; a merged batch's requests run again each on its own), not the
        worker."""
        shape = f"{message.rows} rows"
        if self.pad and (bucket := bucket_for(message.rows, self.buckets)) != message.rows:
            shape += f" (run as the {bucket}-row bucket)"
        cause = _brief(exc)
        log.warning("batch %d: out of memory computing %s: %s", message.batch_id, shape, cause)
        text = f"out of memory computing a batch of {shape}: {cause}"
        return BatchFailed(message.batch_id, "out_of_memory", text)


def _brief(exc: BaseException) -> str:
    """The exception's type and the first line of its message (torch's out-of-memory message
    goes on for lines of allocator advice), at most 300 characters of it."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def start_failed(exc: Exception) -> Fatal:
    """What the parent is told when the worker could not start. Running out of memory (a GPU
    another process holds, say) is the host's condition, not the model's fault: its start may
    pass later, so it is not reported as one (a model load then answers UNAVAILABLE, not
    FAILED_PRECONDITION)."""
    if isinstance(exc, ModelStartError):
        if is_out_of_memory(exc.__cause__):
            return Fatal(f"start-up failed: out of memory: {exc}")
        return Fatal(f"start-up failed: {exc}", model_fault=True)
    return Fatal(f"start-up failed: {type(exc).__name__}: {exc}")


def exit_with_the_server(pid: int) -> None:
    """Exit this worker once process ``pid`` (the serving process) is gone, from a thread of
    its own. A worker waiting for its next batch sees its channel close and exits anyway; this
    one is for a worker busy in the model (a hang, a long batch) when the serving process is
    killed outright: outside a container nothing else would end it, and it would hold its
    memory (GPU memory too) for good. A forked worker's parent is its model's template, not the
    serving process, so the kernel's parent-death signal cannot do this."""
    if pid <= 0:
        return
    try:
        watched = os.pidfd_open(pid)
    except ProcessLookupError:
        log.warning("the serving process (pid %d) is gone already; exiting", pid)
        os._exit(1)
    except OSError as exc:  # (a kernel without pidfd: the channel's end still stops an idle one)
        log.warning("cannot watch the serving process (pid %d): %s", pid, exc)
        return

    def watch() -> None:
        select.select([watched], [], [])  # readable once the process has exited
        log.warning("the serving process (pid %d) is gone; exiting", pid)
        os._exit(1)

    threading.Thread(target=watch, name="watch-server", daemon=True).start()


def ignore_group_signals() -> None:
    """The pool owns this process: a terminal's Ctrl-C or a group-wide SIGTERM must not kill a
    batch while the parent drains; the worker exits on Shutdown or when the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.worker")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the parent")
    parser.add_argument("--in-fd", type=int, required=True, help="inherited input arena")
    parser.add_argument("--out-fd", type=int, required=True, help="inherited output arena")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    ignore_group_signals()
    keep_large_buffers_in_heap()
    return run(args.fd, args.in_fd, args.out_fd, args.log_level)


def run(fd: int, in_fd: int, out_fd: int, log_level: str) -> int:
    """Serve as a worker over the channel ``fd`` with the two arenas; the exit code."""
    # A crash in native code (a model's kernel, a library of its pre-processing) would leave
    # only "channel closed" in the log: print the Python stack of the crash to stderr first.
    faulthandler.enable()
    channel = Channel(socket.socket(fileno=fd))
    init = channel.recv()
    if not isinstance(init, Init):
        return 2
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s worker[{init.worker_id} pid={os.getpid()}] %(message)s",
        force=True,
    )
    exit_with_the_server(init.server_pid)
    if init.version != IPC_VERSION:
        channel.send(
            Fatal(f"IPC version {init.version} from the parent, worker speaks {IPC_VERSION}")
        )
        return 2
    try:
        worker = Worker(channel, init, in_fd, out_fd)
        warm_s = worker.warm_up()
    except Exception as exc:
        log.exception("start-up failed")
        channel.send(start_failed(exc))
        return 1
    freeze_long_lived("worker")  # the model and its framework live as long as the worker
    spin_us = idle_spin_us(init.model.pool.idle_spin_us, worker.backend.device)
    log.info(
        "warm: %s, buckets %s, load %.2f s, warm-up %.2f s, idle spin %g µs",
        worker.backend.describe(),
        list(worker.buckets),
        worker.load_s,
        warm_s,
        spin_us,
    )
    channel.send(
        Ready(
            IPC_VERSION,
            os.getpid(),
            worker.backend.device,
            worker.backend.describe(),
            worker.buckets,
            worker.pad,
            warm_s,
            worker.load_s,
        )
    )
    channel.spin_s = spin_us / 1e6  # (not while loading and warming)
    if spin_us > 0:
        channel.pause = SpinPause(throttle_watch(), "idle spin")  # (no limit: reads nothing)
    try:
        worker.serve_forever()
    except EOFError:
        log.info("parent closed the channel; exiting")
    except Exception as exc:
        log.exception("fatal error; exiting so the pool replaces this worker")
        cause: BaseException = exc
        batch_id = -1
        if isinstance(exc, FatalBatchError):
            cause, batch_id = exc.__cause__ or exc, exc.batch_id
        with contextlib.suppress(OSError):  # the parent may be gone; the exit tells it anyway
            channel.send(Fatal(f"{type(cause).__name__}: {cause}", batch_id))
        return 1
    return 0
