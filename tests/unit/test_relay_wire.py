"""The relay wire: frames cut from any chunking of the byte stream, limits, and the writer's
coalescing and back-pressure."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec
import pytest

from serve.frontend.relay_wire import (
    FrameDecoder,
    FrameWriter,
    Hello,
    RelayCall,
    RelayCancel,
    RelayRing,
    frame,
    to_hub_decoder,
)
from serve.pool.arena import create_memfd

MESSAGES = [
    Hello(3, 0),
    RelayCall(1, "/inference.GRPCInferenceService/ModelInfer", 1.5, b"x" * 300),
    RelayCancel(1),
    RelayCall(2, "/grpc.health.v1.Health/Check", None, b""),
]
STREAM = b"".join(frame(m) for m in MESSAGES)


def decode_in_chunks(size: int) -> list[Any]:
    decoder = FrameDecoder(to_hub_decoder, max_frame=4096)
    out: list[Any] = []
    for start in range(0, len(STREAM), size):
        out += decoder.feed(STREAM[start : start + size])
    return out


@pytest.mark.parametrize("size", [1, 3, 7, 64, len(STREAM)])
def test_every_chunking_of_the_stream_gives_the_same_messages(size: int):
    assert decode_in_chunks(size) == MESSAGES


def test_a_single_whole_frame_decodes_at_once():
    decoder = FrameDecoder(to_hub_decoder, max_frame=4096)
    assert decoder.feed(frame(MESSAGES[1])) == [MESSAGES[1]]
    assert decoder.feed(frame(MESSAGES[2])) == [MESSAGES[2]]


def test_a_frame_over_the_limit_is_refused_before_it_is_buffered():
    decoder = FrameDecoder(to_hub_decoder, max_frame=100)
    with pytest.raises(ValueError, match="over the 100-byte limit"):
        decoder.feed(frame(MESSAGES[1])[:10])  # the header alone is enough to refuse it


def test_bytes_that_are_not_a_message_raise_a_decode_error():
    decoder = FrameDecoder(to_hub_decoder, max_frame=4096)
    with pytest.raises(msgspec.DecodeError):
        decoder.feed(b"\x05\x00\x00\x00hello")


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []
        self.closed = False

    def set_write_buffer_limits(self, high: int) -> None:
        self.high = high

    def writelines(self, frames: list[bytes]) -> None:
        self.writes.append(list(frames))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_frames_written_in_one_turn_leave_in_one_write():
    async def main() -> list[list[bytes]]:
        transport = FakeTransport()
        writer = FrameWriter(transport)  # type: ignore[arg-type]
        for message in MESSAGES[:3]:
            writer.write(message)
        await asyncio.sleep(0)  # the end of this turn of the loop
        writer.write(MESSAGES[3])
        await asyncio.sleep(0)
        return transport.writes

    writes = asyncio.run(main())
    assert writes == [[frame(m) for m in MESSAGES[:3]], [frame(MESSAGES[3])]]


def test_writers_wait_while_the_peer_is_behind_and_go_on_when_it_catches_up():
    async def main() -> tuple[bool, bool]:
        writer = FrameWriter(FakeTransport())  # type: ignore[arg-type]
        await writer.backpressure()  # not paused: no wait
        writer.pause_writing()
        waiting = asyncio.ensure_future(writer.backpressure())
        await asyncio.sleep(0)
        blocked = not waiting.done()
        writer.resume_writing()
        await asyncio.wait_for(waiting, 5)
        return blocked, waiting.done()

    assert asyncio.run(main()) == (True, True)


def test_closing_the_writer_releases_its_waiters():
    async def main() -> bool:
        writer = FrameWriter(FakeTransport())  # type: ignore[arg-type]
        writer.pause_writing()
        waiting = asyncio.ensure_future(writer.backpressure())
        await asyncio.sleep(0)
        writer.close()
        await asyncio.wait_for(waiting, 5)
        return writer.closing

    assert asyncio.run(main()) is True


def _ring(slots: int = 3, slot_bytes: int = 1000) -> RelayRing:
    fd = create_memfd("test-ring", slots * slot_bytes)
    try:
        return RelayRing(fd, slots, slot_bytes)
    finally:
        os.close(fd)


def test_the_ring_places_parts_in_a_slot_and_the_other_side_reads_them_back():
    ring = _ring()
    parts = [b"a" * 10, b"", b"b" * 990]
    slot, places = ring.put(parts)  # type: ignore[misc]
    assert [bytes(view) for view in ring.parts(places)] == parts
    assert all(slot * 1000 <= offset <= (slot + 1) * 1000 for offset, _ in places)


def test_slots_are_handed_out_most_recently_freed_first_and_run_out():
    ring = _ring(slots=3)
    taken = [ring.put([b"x"]) for _ in range(3)]
    assert [t[0] for t in taken if t] == [0, 1, 2]
    assert ring.put([b"x"]) is None and ring.free == 0  # every slot taken: the call goes inline
    ring.release(1)
    again = ring.put([b"y"])
    assert again is not None and again[0] == 1  # reused first: few pages are ever touched
    assert bytes(ring.parts(again[1])[0]) == b"y"


def test_parts_larger_than_a_slot_go_inline():
    ring = _ring(slot_bytes=1000)
    assert ring.put([b"x" * 600, b"y" * 401]) is None
    assert ring.free == 3


@pytest.mark.parametrize("place", [(2990, 20), (-1, 5), (0, -1), (3000, 1)])
def test_places_outside_the_ring_are_refused(place: tuple[int, int]):
    with pytest.raises(ValueError, match="outside the 3000-byte ring"):
        _ring().parts([place])
