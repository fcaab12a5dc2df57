"""The worker's end of its channel: framing over a real socket pair, and the idle spin."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from serve.config import CUDA_IDLE_SPIN_US
from serve.pool.messages import RunBatch, Shutdown, frame
from serve.worker.main import Channel, idle_spin_us


@pytest.fixture
def pair():
    parent, child = socket.socketpair()
    yield parent, child
    parent.close()
    child.close()


def test_messages_split_or_packed_in_any_way_arrive_whole_and_in_order(pair):
    parent, child = pair
    channel = Channel(child)
    sent = [RunBatch(i, i % 2, i + 1, []) for i in range(5)] + [Shutdown("done")]
    stream = b"".join(frame(m) for m in sent)
    cuts = [1, 3, 7, len(frame(sent[0])) + 2, len(stream) - 5]  # mid-header and mid-payload
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    sender = threading.Thread(target=lambda: [parent.sendall(p) for p in pieces])
    sender.start()
    received = [channel.recv() for _ in sent]
    sender.join(timeout=10)
    assert received == sent


@pytest.mark.parametrize("spin_s", [0.0, 0.05])
def test_the_parent_closing_ends_the_channel_with_eof(pair, spin_s):
    parent, child = pair
    channel = Channel(child, spin_s=spin_s)
    parent.sendall(frame(RunBatch(1, 0, 1, []))[:6])  # a header and part of a payload
    parent.close()
    with pytest.raises(EOFError, match="mid-message"):
        channel.recv()


def test_a_batch_sent_during_the_spin_ends_it_at_once(pair):
    parent, child = pair
    channel = Channel(child, spin_s=5.0)
    got: list[object] = []
    receiver = threading.Thread(target=lambda: got.append(channel.recv()))
    start = time.perf_counter()
    receiver.start()
    parent.sendall(frame(RunBatch(9, 1, 3, [])))
    receiver.join(timeout=10)
    assert got == [RunBatch(9, 1, 3, [])]
    assert time.perf_counter() - start < 2.5  # the spin saw it, not its 5 s running out


def test_a_spin_with_nothing_to_read_busy_polls_for_its_time_and_returns(pair):
    _, child = pair
    channel = Channel(child, spin_s=0.05)
    start_cpu, start = time.thread_time(), time.perf_counter()
    channel._spin()
    cpu, wall = time.thread_time() - start_cpu, time.perf_counter() - start
    assert wall >= 0.05
    assert cpu >= 0.5 * wall  # it polled on the CPU rather than sleeping


def test_a_spin_returns_at_once_when_a_message_is_waiting(pair):
    parent, child = pair
    channel = Channel(child, spin_s=5.0)
    parent.sendall(frame(RunBatch(2, 0, 1, [])))
    start = time.perf_counter()
    assert channel.recv() == RunBatch(2, 0, 1, [])
    assert time.perf_counter() - start < 2.5  # far less than the 5 s spin


def test_a_spin_returns_at_once_when_the_parent_has_closed(pair):
    parent, child = pair
    channel = Channel(child, spin_s=5.0)
    parent.close()
    start = time.perf_counter()
    with pytest.raises(EOFError, match="parent closed the channel"):
        channel.recv()
    assert time.perf_counter() - start < 2.5


@pytest.mark.parametrize(
    ("configured", "device", "expected"),
    [(-1, "cuda:0", CUDA_IDLE_SPIN_US), (-1, "cpu", 0.0), (0, "cuda:1", 0.0), (500, "cpu", 500)],
)
def test_the_idle_spin_is_automatic_on_cuda_devices_only_and_a_set_value_wins(
    configured, device, expected
):
    assert idle_spin_us(configured, device) == expected


def test_a_frame_over_the_limit_is_a_corrupt_channel_not_the_parents_close(pair):
    from serve.pool.messages import FRAME_HEADER, MAX_FRAME_BYTES

    parent, child = pair
    parent.sendall(FRAME_HEADER.pack(MAX_FRAME_BYTES + 1))
    with pytest.raises(RuntimeError, match="corrupt channel: a frame of 2147483649 bytes"):
        Channel(child).recv()  # (an EOFError would read as the parent's close, exit 0)


def test_it_spins_only_while_batches_come_closer_together_than_the_spin(pair, monkeypatch):
    parent, child = pair
    channel = Channel(child, spin_s=0.5)
    spins: list[int] = []
    real_spin = channel._spin
    monkeypatch.setattr(channel, "_spin", lambda: (spins.append(1), real_spin()))
    channel._last_wait = 2.0  # the last batch came 2 s after the one before: light load
    parent.sendall(frame(RunBatch(1, 0, 1, [])))
    assert channel.recv() == RunBatch(1, 0, 1, [])
    assert spins == []  # no polling after a long wait: it would have burnt the core for nothing
    parent.sendall(frame(RunBatch(2, 0, 1, [])))  # this one was waiting at once: a short wait
    assert channel.recv() == RunBatch(2, 0, 1, [])
    assert spins == [1]


def test_the_spin_pauses_while_the_cpu_limit_stops_the_process_and_resumes_after(pair, monkeypatch):
    """Polling spends the quota the rest of the server is short of: a worker whose CPU limit
    stopped the process lately sleeps in recv instead (serve/cpus.SpinPause says when), and
    polls again once the limit has let go."""
    from serve.cpus import SpinPause, ThrottleWatch

    clock, periods = [1000.0], [0]
    pause = SpinPause(ThrottleWatch(lambda: periods[0]), "idle spin", clock=lambda: clock[0])
    parent, child = pair
    channel = Channel(child, spin_s=0.5, pause=pause)
    spins: list[float] = []
    monkeypatch.setattr(channel, "_spin", lambda: spins.append(clock[0]))

    def batch_at(now: float, batch_id: int) -> None:
        clock[0] = now
        parent.sendall(frame(RunBatch(batch_id, 0, 1, [])))
        assert channel.recv() == RunBatch(batch_id, 0, 1, [])

    batch_at(1000.0, 1)  # no period stopped yet: it polls
    periods[0] = 3  # the limit stops the process
    batch_at(1000.1, 2)
    batch_at(1000.5, 3)
    assert spins == [1000.0]
    later = 1000.5 + pause.memory_s + 2 * pause.check_s
    batch_at(later, 4)  # no new stop for longer than the memory: polling again
    assert spins == [1000.0, later]


def test_without_a_cpu_limit_the_spin_is_never_paused(pair):
    _, child = pair
    assert Channel(child, spin_s=0.5).pause() is False
