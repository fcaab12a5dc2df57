"""The parent's handling of a worker's messages (no process: messages are fed in directly)."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.errors import InvalidInputError, ModelExecutionError, WorkerLostError
from serve.pool.messages import Fatal, frame, from_worker_decoder
from serve.pool.worker_handle import WorkerHandle, WorkerSettings, WorkerState, _InFlight
from tests.unit.test_controller import _model


def _handle() -> WorkerHandle:
    settings = WorkerSettings(
        device="cpu", threads=1, slots=2, slot_bytes=1 << 20, startup_timeout_s=5
    )
    handle = WorkerHandle(_model(), "m#1", settings, lambda w: None)
    handle.state = WorkerState.WARM
    return handle


def test_a_fatal_error_fails_its_own_batch_for_good_and_the_others_as_retryable():
    async def main():
        handle = _handle()
        outcomes: dict[int, list[object]] = {7: [], 8: []}
        for batch_id in (7, 8):
            slot = handle.reserve()
            handle._pending[batch_id] = _InFlight(slot, outcomes[batch_id].append, 0.0, 0, 0)
        message = from_worker_decoder.decode(frame(Fatal("CUDA error: device-side assert", 7))[4:])
        handle._on_message(message)
        return handle, outcomes

    handle, outcomes = asyncio.run(main())
    assert handle.state is WorkerState.DEAD
    (culprit,), (bystander,) = outcomes[7], outcomes[8]  # each told exactly once
    assert isinstance(culprit, ModelExecutionError)
    assert "this batch broke worker m#1" in str(culprit)
    assert isinstance(bystander, WorkerLostError)  # the batcher retries these


def test_the_worker_turns_a_fatal_backend_error_into_a_fatal_for_that_batch(monkeypatch):
    import os

    import numpy as np

    import serve.backends
    from serve.pool.arena import Arena, create_memfd
    from serve.pool.messages import IPC_VERSION, Init, RunBatch
    from serve.protocol.datatypes import Datatype
    from serve.worker.main import FatalBatchError, Worker

    class Poisoned:
        fixed_shapes = False
        device = "cuda:0"

        def run(self, inputs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        def is_fatal(self, exc):
            return True

        def pin_host_memory(self, address, size):
            return False

    monkeypatch.setattr(serve.backends, "load_backend", lambda *args, **kwargs: Poisoned())
    in_fd, out_fd = create_memfd("in", 1 << 20), create_memfd("out", 1 << 20)
    model = _model()
    init = Init(IPC_VERSION, model, "m#1", "cuda:0", 1, 1, 1 << 20, None)
    worker = Worker(None, init, in_fd, out_fd)  # type: ignore[arg-type]
    parent_view = Arena(in_fd, 1, 1 << 20)
    os.close(in_fd)
    os.close(out_fd)
    refs = parent_view.write(0, [("X", Datatype.FP32, np.zeros((1, 4), np.float32))])
    with pytest.raises(FatalBatchError) as caught:
        worker.run_batch(RunBatch(41, 0, 1, refs))
    assert caught.value.batch_id == 41
    assert "illegal memory access" in str(caught.value.__cause__)


def test_the_link_decodes_whole_split_and_coalesced_frames():
    from serve.pool.link import WorkerLink
    from serve.pool.messages import BatchFailed

    got: list[object] = []
    lost: list[str] = []
    link = WorkerLink(got.append, lost.append)
    frames = [frame(BatchFailed(i, "execution", "x" * i)) for i in range(4)]
    link.data_received(frames[0])  # exactly one message
    link.data_received(frames[1][:3])  # a header cut short
    link.data_received(frames[1][3:] + frames[2] + frames[3][:-1])  # the rest, one more, a part
    link.data_received(frames[3][-1:])
    assert [m.batch_id for m in got] == [0, 1, 2, 3]
    assert [m.message for m in got] == ["", "x", "xx", "xxx"]
    assert not lost


def test_a_worker_whose_channel_is_closed_is_dead_at_once_and_takes_no_more_batches():
    import numpy as np

    from serve.errors import WorkerLostError as Lost

    class ClosedLink:
        def send(self, message):
            raise ConnectionError("worker channel is closed")

        def close(self):
            pass

    async def main():
        handle = _handle()
        handle._link = ClosedLink()
        handle._inputs = _arena()
        slot = handle.reserve()
        with pytest.raises(Lost, match="closed its channel"):
            handle.submit(slot, [[np.zeros((1, 64), np.float32)]], 1, lambda outcome: None)
        return handle

    handle = asyncio.run(main())
    assert handle.state is WorkerState.DEAD
    assert handle.free_slots == 0, "a retried batch could be routed back to it"


def _arena():
    import os

    from serve.pool.arena import Arena, create_memfd

    fd = create_memfd("test", 2 << 20)
    try:
        return Arena(fd, 2, 1 << 20)
    finally:
        os.close(fd)


def test_a_worker_that_cannot_be_launched_is_dead_and_leaves_no_descriptor_open(monkeypatch):
    import os

    changes: list[WorkerState] = []
    settings = WorkerSettings(
        device="cpu", threads=1, slots=2, slot_bytes=1 << 20, startup_timeout_s=5
    )
    handle = WorkerHandle(_model(), "m#1", settings, lambda w: changes.append(w.state))

    async def no_more_processes(*args: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(handle, "_launch", no_more_processes)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Too many open files"):
        asyncio.run(handle.start())
    assert handle.state is WorkerState.DEAD and changes == [WorkerState.DEAD]  # the pool is told
    assert set(os.listdir("/proc/self/fd")) <= before  # socketpair, memory files, mappings


def test_a_batch_that_cannot_be_sent_gives_its_slot_back():
    import os

    import numpy as np

    from serve.pool.arena import Arena, create_memfd

    class BrokenLink:
        def send(self, message: object) -> None:
            raise ValueError("cannot encode")

    handle = _handle()
    fd = create_memfd("in", 2 << 20)
    handle._inputs = Arena(fd, 2, 1 << 20)
    os.close(fd)
    handle._link = BrokenLink()  # type: ignore[assignment]
    slot = handle.reserve()
    with pytest.raises(ValueError, match="cannot encode"):
        handle.submit(slot, [[np.zeros((1, 4), np.float32)]], 1, lambda outcome: None)
    assert handle.free_slots == 2 and not handle.busy
    handle._inputs.close()


def _linked_handle(**kwargs: object) -> tuple[WorkerHandle, object]:
    """A warm handle and the link its messages arrive through (no socket: frames are fed in)."""
    from serve.pool.link import WorkerLink

    settings = WorkerSettings(
        device="cpu", threads=1, slots=2, slot_bytes=1 << 20, startup_timeout_s=5
    )
    handle = WorkerHandle(_model(), "m#1", settings, **kwargs)  # type: ignore[arg-type]
    handle.state = WorkerState.WARM
    return handle, WorkerLink(handle._on_message, handle._on_lost, handle.worker_id)


def _in_flight(handle: WorkerHandle, batch_id: int, done) -> None:
    handle._pending[batch_id] = _InFlight(handle.reserve(), done, 0.0, 0, 0)


def test_a_batch_callback_that_raises_costs_that_batch_only(caplog):
    from serve.pool.messages import BatchFailed

    def buggy(outcome: object) -> None:
        raise KeyError("a bug where the result goes")

    async def main():
        handle, link = _linked_handle(on_change=lambda w: None)
        other: list[object] = []
        _in_flight(handle, 7, buggy)
        _in_flight(handle, 8, other.append)
        link.data_received(  # type: ignore[attr-defined]
            frame(BatchFailed(7, "execution", "x")) + frame(BatchFailed(8, "execution", "y"))
        )
        return handle, other

    handle, other = asyncio.run(main())
    assert handle.state is WorkerState.WARM and handle.free_slots == 2  # both slots are back
    (outcome,) = other
    assert isinstance(outcome, ModelExecutionError) and "y" in str(outcome)
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.exc_info is not None
    assert "worker m#1" in record.getMessage() and "batch 7" in record.getMessage()
    assert "BatchFailed" in record.getMessage()


def test_a_slot_listener_that_raises_does_not_keep_its_answer_from_the_batch(caplog):
    from serve.pool.messages import BatchFailed

    def broken_listener() -> None:
        raise RuntimeError("a bug in whoever listens for free slots")

    handle, link = _linked_handle(on_change=lambda w: None, on_slot_free=broken_listener)
    got: list[object] = []
    _in_flight(handle, 7, got.append)
    link.data_received(frame(BatchFailed(7, "execution", "x")))  # type: ignore[attr-defined]
    assert len(got) == 1 and isinstance(got[0], ModelExecutionError)
    assert handle.state is WorkerState.WARM
    assert any(
        "m#1" in r.getMessage() and "BatchFailed for batch 7" in r.getMessage() and r.exc_info
        for r in caplog.records
    )


def test_a_dying_worker_tells_every_batch_and_the_pool_even_if_one_callback_raises():
    def buggy(outcome: object) -> None:
        raise KeyError("a bug where the result goes")

    changes: list[WorkerState] = []
    handle, _ = _linked_handle(on_change=lambda w: changes.append(w.state))
    told: list[object] = []
    _in_flight(handle, 7, buggy)
    _in_flight(handle, 8, told.append)
    handle._on_lost("channel closed")
    assert [type(o) for o in told] == [WorkerLostError]  # the batcher retries it elsewhere
    assert changes == [WorkerState.DEAD]  # the pool forgets it and starts a replacement


class _Process:
    pid = 4242

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.killed = False

    def kill(self) -> None:
        self.killed = True


class _Transport:
    """Enough of a transport for the link to cut: abort() reports the loss as the loop would."""

    def __init__(self) -> None:
        self.link: object = None

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        self.link.connection_lost(None)  # type: ignore[attr-defined]

    close = abort


def test_a_worker_whose_channel_the_link_cuts_is_killed_not_left_running():
    from serve.pool.messages import FRAME_HEADER

    handle, link = _linked_handle(on_change=lambda w: None)
    handle._link = link  # type: ignore[assignment]
    process = handle._process = _Process()  # type: ignore[assignment]
    transport = _Transport()
    transport.link = link
    link.connection_made(transport)  # type: ignore[attr-defined]
    link.data_received(FRAME_HEADER.pack(3) + b"\xc1\xc1\xc1")  # type: ignore[attr-defined]
    assert handle.state is WorkerState.DEAD
    assert process.killed  # it may sit in a batch for ever: no channel, no watchdog


def test_a_worker_that_closes_its_own_channel_is_left_to_exit():
    handle, link = _linked_handle(on_change=lambda w: None)
    handle._link = link  # type: ignore[assignment]
    process = handle._process = _Process()  # type: ignore[assignment]
    link.connection_lost(None)  # type: ignore[attr-defined]  # its end closed: it is exiting
    assert handle.state is WorkerState.DEAD and not process.killed


def test_a_probe_waiting_for_a_slot_gets_the_next_one_ahead_of_live_traffic():
    from serve.pool.messages import BatchFailed

    async def main():
        notified: list[None] = []
        handle, link = _linked_handle(
            on_change=lambda w: None, on_slot_free=lambda: notified.append(None)
        )
        _in_flight(handle, 7, lambda outcome: None)
        _in_flight(handle, 8, lambda outcome: None)
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(handle.next_slot(timeout_s=10))  # both slots are busy
        # (callbacks run in order: the task has begun to wait when the answer arrives)
        loop.call_soon(link.data_received, frame(BatchFailed(7, "execution", "x")))
        slot = await waiting
        late = await handle.next_slot(timeout_s=0)  # none free, none frees: gives up
        dying = asyncio.ensure_future(handle.next_slot(timeout_s=10))
        loop.call_soon(handle._on_lost, "channel closed")
        with pytest.raises(WorkerLostError):
            await dying
        return slot, late, notified

    slot, late, notified = asyncio.run(main())
    assert slot is not None and late is None
    assert notified == []  # the freed slot went to the probe: live traffic was not offered it


def test_the_watchdog_times_a_batch_from_when_the_worker_could_start_it():
    # A worker runs its batches one after another: a second batch sent together with a long
    # first one waits for it in the worker. Its watchdog clock starts when the first is
    # answered, not when it was sent, else two batches of 20 s each kill a healthy worker.
    from serve.pool.messages import BatchFailed

    async def main() -> tuple[WorkerState, WorkerState, list[object]]:
        handle = _handle()  # (watchdog 30 s)
        told: list[object] = []
        sent = time.monotonic() - 20  # both sent 20 s ago; the first was just answered
        for batch_id in (1, 2):
            handle._pending[batch_id] = _InFlight(handle.reserve(), told.append, sent, 0, 0)
        handle._on_message(BatchFailed(1, "invalid_input", "took 20 s"))
        handle.check_watchdog(time.monotonic() + 15)  # the second has run 15 s
        running = handle.state
        handle.check_watchdog(time.monotonic() + 31)  # ... and now 31 s: it hangs
        return running, handle.state, told

    running, after, told = asyncio.run(main())
    assert running is WorkerState.WARM
    assert after is WorkerState.DEAD
    assert [type(o) for o in told] == [InvalidInputError, WorkerLostError]


def test_a_start_cancelled_by_its_stopping_pool_is_not_logged_as_a_lost_worker(monkeypatch, caplog):
    import logging

    caplog.set_level(logging.INFO, "serve.pool.worker_handle")
    changes: list[WorkerState] = []
    settings = WorkerSettings(
        device="cpu", threads=1, slots=2, slot_bytes=1 << 20, startup_timeout_s=5
    )
    handle = WorkerHandle(_model(), "m#2", settings, lambda w: changes.append(w.state))

    async def main() -> None:
        launching = asyncio.Event()

        async def slow_fork(*args: object) -> None:
            launching.set()
            await asyncio.sleep(60)

        monkeypatch.setattr(handle, "_launch", slow_fork)
        start = asyncio.create_task(handle.start())
        await launching.wait()
        start.cancel()  # as WorkerPool.stop does to a worker still starting
        with pytest.raises(asyncio.CancelledError):
            await start

    asyncio.run(main())
    assert handle.state is WorkerState.DEAD and changes == [WorkerState.DEAD]  # the pool is told
    assert "worker m#2: start cancelled (its pool is stopping)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
