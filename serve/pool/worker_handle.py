"""The parent's handle on one worker process: spawn, hand-shake, run batches, notice death."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from serve.batching import BatchResult
from serve.batching.batcher import BatchCallback
from serve.batching.merge import Array
from serve.config import ModelConfig
from serve.errors import (
    InvalidInputError,
    ModelExecutionError,
    ModelFaultError,
    ModelNotReadyError,
    ModelOutOfMemoryError,
    WorkerLostError,
)
from serve.pool.arena import Arena, create_memfd
from serve.pool.link import WorkerLink
from serve.pool.loop_spin import SPIN
from serve.pool.messages import (
    IPC_VERSION,
    BatchDone,
    BatchFailed,
    Fatal,
    FromWorker,
    Init,
    Ready,
    RunBatch,
    Shutdown,
)
from serve.pool.template import ForkedProcess, TemplateError, WorkerTemplate
from serve.protocol.datatypes import Datatype

log = logging.getLogger(__name__)

Process = asyncio.subprocess.Process | ForkedProcess


class WorkerState(enum.Enum):
    STARTING = "starting"
    WARM = "warm"
    STOPPING = "stopping"
    DEAD = "dead"


STOP_TIMEOUT_S = 10.0  # a stopping worker that has not exited by then is killed

# A failed batch's error, by the kind the worker gave (any other kind: ModelExecutionError)
BATCH_FAILED: dict[str, type[ModelExecutionError | InvalidInputError]] = {
    "invalid_input": InvalidInputError,
    "execution": ModelExecutionError,
    "out_of_memory": ModelOutOfMemoryError,
}
OUT_OF_MEMORY_ADVICE = "; send fewer rows per request, or retry later"


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    device: str  # the model's: "auto", "cpu" or "cuda:N"
    threads: int
    slots: int
    slot_bytes: int
    startup_timeout_s: float
    watchdog_s: float = 30.0
    stop_timeout_s: float = STOP_TIMEOUT_S
    log_level: str = "INFO"
    bundle_id: str = ""  # the worker verifies the bundle against it before loading anything
    require_gpu: bool = False  # device "auto" must resolve to CUDA, else the start fails


@dataclass(slots=True)
class _InFlight:
    slot: int
    done: BatchCallback
    sent_at: float  # monotonic, for the watchdog
    sent_ns: int  # perf counter, for the breakdown
    write_ns: int  # copying the inputs into shared memory


def _settle(future: asyncio.Future[int | None], value: int | None) -> None:
    if not future.done():
        future.set_result(value)


class WorkerHandle:
    def __init__(
        self,
        model: ModelConfig,
        worker_id: str,
        settings: WorkerSettings,
        on_change: Callable[[WorkerHandle], None],
        template: WorkerTemplate | None = None,
        on_slot_free: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.worker_id = worker_id
        self.settings = settings
        self.state = WorkerState.STARTING
        self.ready: Ready | None = None
        self._on_change = on_change
        # a freed slot changes nothing readiness depends on: a cheaper notice than on_change
        self._on_slot_free = on_slot_free or (lambda: on_change(self))
        self._template = template
        self._link: WorkerLink | None = None
        self._process: Process | None = None
        self._inputs: Arena | None = None
        self._outputs: Arena | None = None
        self._free_slots = list(range(settings.slots))
        self._pending: dict[int, _InFlight] = {}  # batch id → its slot, callback and times
        self.draining = False  # takes no new batches (being retired)
        self.retiring = False  # to be retired once a replacement is warm
        self.probed_ok = False  # passed its latest probe
        self.probe_failures = 0  # consecutive failed probes
        self.last_success = 0.0  # monotonic time of the last successful batch
        # Batches in a row that failed in the model (execution errors, unreadable outputs; not
        # invalid input): a success resets it. The controller probes a worker whose count
        # grows, and the probe (known-good inputs) decides whether the worker is broken.
        self.failed_in_a_row = 0
        self.last_batch_error = ""
        self.lost_reason = ""  # why it died, once it has
        self.started_at = 0.0  # monotonic time its start began
        self._answered_at = 0.0  # monotonic time of its latest answer (the watchdog's clock)
        self._slot_waiter: asyncio.Future[int | None] | None = None  # next_slot()'s
        self._ready_future: asyncio.Future[Ready] | None = None
        self._ids = itertools.count()
        self._reaper: asyncio.Task[None] | None = None
        self._types = [Datatype(s.datatype) for s in model.inputs]
        self._input_names = [s.name for s in model.inputs]

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def free_slots(self) -> int:
        """Slots open to new batches: none unless warm and not draining."""
        if self.state is not WorkerState.WARM or self.draining:
            return 0
        return len(self._free_slots)

    @property
    def alive(self) -> bool:
        return self.state is not WorkerState.DEAD

    @property
    def busy(self) -> bool:
        return len(self._free_slots) < self.settings.slots

    async def start(self) -> None:
        """Spawn the process and wait until it reports warm (or fail, killing it)."""
        self.started_at = time.monotonic()
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        size = self.settings.slots * self.settings.slot_bytes
        fds: list[int] = []
        try:
            fds.append(create_memfd(f"warmserve-in-{self.worker_id}", size))
            fds.append(create_memfd(f"warmserve-out-{self.worker_id}", size))
            in_fd, out_fd = fds
            self._inputs = Arena(in_fd, self.settings.slots, self.settings.slot_bytes)
            self._outputs = Arena(out_fd, self.settings.slots, self.settings.slot_bytes)
            self._process = await self._launch(theirs.fileno(), in_fd, out_fd)
        except BaseException as exc:  # (out of file descriptors or memory, say): nothing leaks
            ours.close()
            for arena in (self._inputs, self._outputs):
                if arena is not None:
                    arena.close()
            if isinstance(exc, asyncio.CancelledError):  # its pool stops: nothing was lost
                log.info("worker %s: start cancelled (its pool is stopping)", self.worker_id)
                self.state = WorkerState.STOPPING
                self._die("start cancelled")
            else:  # the pool forgets it
                self._die(f"could not be started: {type(exc).__name__}: {exc}")
            raise
        finally:
            theirs.close()
            for fd in fds:
                os.close(fd)
        how = "forked from the template" if isinstance(self._process, ForkedProcess) else "spawned"
        log.info("worker %s %s (pid %d)", self.worker_id, how, self._process.pid)
        self._ready_future = loop.create_future()
        _, link = await loop.connect_accepted_socket(
            lambda: WorkerLink(self._on_message, self._on_lost, self.worker_id), sock=ours
        )
        self._link = link
        self._reaper = asyncio.create_task(self._reap(), name=f"reap:{self.worker_id}")
        link.send(
            Init(
                IPC_VERSION,
                self.model,
                self.worker_id,
                self.settings.device,
                self.settings.threads,
                self.settings.slots,
                self.settings.slot_bytes,
                self.model.batching.pad_to_bucket,
                self.settings.bundle_id,
                self.settings.require_gpu,
                os.getpid(),
            )
        )
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.startup_timeout_s):
                ready = await self._ready_future
        except TimeoutError:
            self._die(f"not warm after {self.settings.startup_timeout_s:.0f} s")
            await self.kill()
            raise ModelNotReadyError(
                f"worker {self.worker_id} not warm within {self.settings.startup_timeout_s} s"
            ) from None
        except ModelNotReadyError:
            await self.kill()
            raise
        self.ready = ready
        self.state = WorkerState.WARM
        log.info(
            "worker %s warm in %.2f s (%s; load %.2f s, warm-up %.2f s, buckets %s)",
            self.worker_id,
            time.monotonic() - started,
            ready.backend,
            ready.load_s,
            ready.warmup_s,
            list(ready.buckets),
        )
        self._on_change(self)

    async def _launch(self, channel_fd: int, in_fd: int, out_fd: int) -> Process:
        """Fork the worker from the template when there is one, else spawn a fresh interpreter."""
        if self._template is not None and self._template.alive:
            try:
                return await self._template.fork(channel_fd, in_fd, out_fd, self.settings.log_level)
            except TemplateError as exc:
                log.warning("worker %s: %s; spawning it instead", self.worker_id, exc)
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "serve.worker",
            "--fd",
            str(channel_fd),
            "--in-fd",
            str(in_fd),
            "--out-fd",
            str(out_fd),
            "--log-level",
            self.settings.log_level,
            pass_fds=(channel_fd, in_fd, out_fd),
        )

    def reserve(self) -> int:
        """Claim a slot for one batch; pass it to submit() or run() (which free it) or release()."""
        return self._free_slots.pop()

    def release(self, slot: int) -> None:
        waiter = self._slot_waiter
        if waiter is not None and not waiter.done():  # a probe waits: it goes first
            self._slot_waiter = None
            waiter.set_result(slot)
            return
        self._free_slots.append(slot)
        self._on_slot_free()

    async def next_slot(self, timeout_s: float) -> int | None:
        """A free slot now, or the next one an answered batch frees, ahead of the live batches
        waiting for one: a probe of a worker whose live batches fail must not starve behind
        them. None when no slot frees within ``timeout_s``; WorkerLostError if it dies first."""
        if self.state is not WorkerState.WARM:
            raise WorkerLostError(f"worker {self.worker_id} is {self.state.value}")
        if self._free_slots:
            return self._free_slots.pop()
        if self._slot_waiter is not None:
            raise RuntimeError(f"worker {self.worker_id}: a probe already waits for a slot")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[int | None] = loop.create_future()
        self._slot_waiter = waiter
        timer = loop.call_later(timeout_s, _settle, waiter, None)
        try:
            return await waiter
        except BaseException:  # cancelled (the controller stops): a slot handed over goes back
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                slot = waiter.result()
                if slot is not None:
                    self.release(slot)
            raise
        finally:
            timer.cancel()
            if self._slot_waiter is waiter:
                self._slot_waiter = None

    def submit(
        self, slot: int, parts: Sequence[Sequence[Array]], rows: int, done: BatchCallback
    ) -> None:
        """Send one batch in ``slot``: each request's inputs (``parts``) are copied into shared
        memory, concatenated. ``done`` gets the BatchResult or the error exactly once, from the
        event loop. The slot is freed only when the worker has answered, so a caller that gives
        up never lets a later batch overwrite memory the worker is still using. A batch running
        past the watchdog means the worker hangs: check_watchdog(), called periodically, kills
        it and the batch ends with WorkerLostError (the batcher retries it).

        Raises WorkerLostError at once (and frees the slot) when the worker cannot take it."""
        link, arena = self._link, self._inputs
        if self.state is not WorkerState.WARM or link is None or arena is None:
            self.release(slot)
            raise WorkerLostError(f"worker {self.worker_id} is {self.state.value}")
        start = time.perf_counter_ns()
        try:
            if len(parts) == 1:
                columns: list[Sequence[Array]] = [[a] for a in parts[0]]
            else:
                columns = [list(c) for c in zip(*parts, strict=True)]
            refs = arena.write(
                slot, list(zip(self._input_names, self._types, columns, strict=True))
            )
        except BaseException:
            self.release(slot)
            raise
        batch_id = next(self._ids)
        try:
            link.send(RunBatch(batch_id, slot, rows, refs))
        except ConnectionError:
            self.release(slot)
            # Dead from now on, not only when the event loop reports the closed channel: a
            # retried batch must not be routed back to this worker in the meantime.
            self._die("its channel closed")
            raise WorkerLostError(f"worker {self.worker_id} closed its channel") from None
        except BaseException:  # (a message that cannot be encoded, say): the slot comes back
            self.release(slot)
            raise
        sent = time.perf_counter_ns()
        self._pending[batch_id] = _InFlight(slot, done, time.monotonic(), sent, sent - start)
        SPIN.busy(self)

    async def run(self, slot: int, inputs: list[Array], rows: int) -> BatchResult:
        """submit() one batch of ``inputs`` and wait for it (probes use this)."""
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()

        def done(outcome: BatchResult | BaseException) -> None:
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        self.submit(slot, [inputs], rows, done)
        return await future

    def _answered(self, batch_id: int, entry: _InFlight, reply: BatchDone | BatchFailed) -> None:
        received = time.perf_counter_ns()
        outcome: BatchResult | BaseException
        try:
            if isinstance(reply, BatchFailed):
                error = BATCH_FAILED.get(reply.kind, ModelExecutionError)
                advice = OUT_OF_MEMORY_ADVICE if error is ModelOutOfMemoryError else ""
                outcome = error(f"model {self.model.name!r}: {reply.message}{advice}")
                if error is not InvalidInputError:  # the client's input is not the worker's fault
                    self._model_failed(reply.message)
            else:
                arena = self._outputs
                assert arena is not None
                slot = entry.slot
                outputs = [arena.read(slot, ref, copy=True) for ref in reply.outputs]
                outcome = BatchResult(
                    outputs,
                    (  # in the order of serve.batching.batcher.PHASES
                        entry.write_ns,
                        reply.input_ns,
                        reply.compute_ns,
                        reply.output_ns,
                        received - entry.sent_ns,
                        time.perf_counter_ns() - received,
                    ),
                    self.worker_id,
                )
                self.last_success = time.monotonic()
                self.failed_in_a_row = 0
        except Exception as exc:  # unreadable outputs: this batch fails, the worker goes on
            log.exception("worker %s: reading batch outputs failed", self.worker_id)
            outcome = ModelExecutionError(f"model {self.model.name!r}: bad outputs: {exc}")
            self._model_failed(f"bad outputs: {exc}")
        try:
            self.release(entry.slot)  # (listeners may dispatch the next batch from here)
        finally:  # whatever they raise (the link logs it), this batch gets its answer
            self._tell(batch_id, entry, type(reply).__name__, outcome)

    def _model_failed(self, error: str) -> None:
        self.failed_in_a_row += 1
        self.last_batch_error = error

    def _tell(
        self, batch_id: int, entry: _InFlight, cause: str, outcome: BatchResult | BaseException
    ) -> None:
        """Hand a batch its outcome. A callback that raises is a bug where it leads (the
        batcher, say): logged with its traceback, it costs that batch only, never the worker."""
        try:
            entry.done(outcome)
        except Exception:
            log.exception(
                "worker %s: the callback of batch %d raised on its %s (%s); the worker goes on",
                self.worker_id,
                batch_id,
                cause,
                "result" if isinstance(outcome, BatchResult) else type(outcome).__name__,
            )

    def check_watchdog(self, now: float) -> None:
        """Kill the worker if a batch has run longer than the watchdog allows. The worker runs
        its batches in order: the oldest one out started when it was sent or, if it waited
        for the one before it, when that one was answered."""
        if not self._pending or self.state is not WorkerState.WARM:
            return
        batch_id, entry = min(self._pending.items(), key=lambda item: item[1].sent_at)
        if now - max(entry.sent_at, self._answered_at) > self.settings.watchdog_s:
            self._hung(batch_id)

    def _hung(self, batch_id: int) -> None:
        log.error(
            "worker %s (pid %s) hung: batch %d got no answer within the %g s watchdog; killing it",
            self.worker_id,
            self.pid,
            batch_id,
            self.settings.watchdog_s,
        )
        self._die(f"hung (watchdog {self.settings.watchdog_s:g} s)")
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile: nothing to kill
                self._process.kill()  # SIGKILL works on a stopped process too; the reaper reaps

    def _on_message(self, message: FromWorker) -> None:
        if isinstance(message, BatchDone | BatchFailed):
            entry = self._pending.pop(message.batch_id, None)
            if entry is not None:
                if self._pending:  # the next one starts now (only then is the time needed)
                    self._answered_at = time.monotonic()
                    SPIN.busy(self)  # (fewer out now: the loop's spin may be due again)
                self._answered(message.batch_id, entry, message)
        elif isinstance(message, Ready):
            if self._ready_future is not None and not self._ready_future.done():
                self._ready_future.set_result(message)
        elif isinstance(message, Fatal):
            log.error("worker %s reported a fatal error: %s", self.worker_id, message.message)
            culprit = self._pending.pop(message.batch_id, None)
            if culprit is not None:
                # Not retried elsewhere: the same batch would poison the next worker too.
                self._tell(
                    message.batch_id,
                    culprit,
                    "Fatal",
                    ModelExecutionError(
                        f"model {self.model.name!r}: this batch broke worker {self.worker_id} "
                        f"(it is being replaced): {message.message}"
                    ),
                )
            self._die(message.message, model_fault=message.model_fault)

    def _on_lost(self, reason: str) -> None:
        self._die(reason)
        process = self._process
        cut = self._link is not None and self._link.protocol_error
        if cut and process is not None and process.returncode is None:
            # We cut the channel of a live process: one busy in a batch would not see the EOF
            # until the batch ends, and once the pool forgets it no watchdog looks at it (it
            # may hold a GPU the replacement needs).
            log.error("worker %s (pid %s): channel cut; killing it", self.worker_id, self.pid)
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                process.kill()  # the reaper collects it

    def _die(self, reason: str, *, model_fault: bool = False) -> None:
        """``model_fault``: the worker said the model itself failed to load or warm up."""
        if self.state is WorkerState.DEAD:
            return
        expected = self.state is WorkerState.STOPPING
        self.state = WorkerState.DEAD
        self.lost_reason = reason
        if not expected:
            log.error("worker %s (pid %s) lost: %s", self.worker_id, self.pid, reason)
        lost = WorkerLostError(
            f"worker {self.worker_id} of model {self.model.name!r} died: {reason}"
        )
        if self._ready_future is not None and not self._ready_future.done():
            failed = ModelFaultError if model_fault else ModelNotReadyError
            self._ready_future.set_exception(
                failed(f"worker {self.worker_id} failed to start: {reason}")
            )
        waiter, self._slot_waiter = self._slot_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(lost)
        pending, self._pending = self._pending, {}
        for batch_id, entry in pending.items():  # their slots died with the worker
            self._tell(batch_id, entry, "loss", lost)
        if self._link is not None:
            self._link.close()
        self._on_change(self)

    async def _reap(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        self._die("process exited" if code == -1 else f"process exited with code {code}")
        for arena in (self._inputs, self._outputs):
            if arena is not None:
                arena.close()

    async def stop(self) -> None:
        """Ask the worker to finish and exit; kill it if it does not within the stop timeout."""
        if self._process is None or self._process.returncode is not None:
            return
        starting = self.state is WorkerState.STARTING
        if self.state is not WorkerState.DEAD:
            self.state = WorkerState.STOPPING
        if starting:  # nothing to finish, and it reads Shutdown only once warm (it may hang)
            await self.kill()
        elif self._link is not None:
            with contextlib.suppress(ConnectionError):  # already gone: the wait below is short
                self._link.send(Shutdown("pool stopping"))
        try:
            async with asyncio.timeout(self.settings.stop_timeout_s):
                await self._process.wait()
        except TimeoutError:
            log.warning(
                "worker %s did not exit within %.0f s; killing it",
                self.worker_id,
                self.settings.stop_timeout_s,
            )
            await self.kill()
        if self._reaper is not None:
            await asyncio.gather(self._reaper, return_exceptions=True)

    async def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                self._process.kill()
            await self._process.wait()
