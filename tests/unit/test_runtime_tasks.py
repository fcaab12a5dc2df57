"""The runtime's own tasks: what they leave behind when the server stops, and what they log."""

from __future__ import annotations

import asyncio

import pytest

from serve.runtime import ModelEntry, Runtime, _drain_removed


class _Draining:
    """A version whose drain never ends on its own."""

    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self.stopped = False
        self.batch_wait_s: float | None = None

    async def drain(self) -> None:
        self.draining.set()
        await asyncio.Event().wait()

    async def stop(self, batch_wait_s: float = 60.0) -> None:
        self.stopped = True
        self.batch_wait_s = batch_wait_s


def test_a_removed_version_cancelled_while_it_drains_is_still_stopped():
    async def main() -> bool:
        service = _Draining()
        task = asyncio.create_task(_drain_removed(service))  # type: ignore[arg-type]
        await service.draining.wait()
        task.cancel()  # as Runtime.stop cancels a retirement in progress
        with pytest.raises(asyncio.CancelledError):
            await task
        return service.stopped, service.batch_wait_s

    # stopped without waiting for its batches: the server is stopping, their callers are gone
    assert asyncio.run(main()) == (True, 0)


def test_a_watch_or_retirement_that_fails_is_logged_with_its_model(caplog):
    async def broken() -> None:
        raise RuntimeError("the watch broke")

    async def main() -> ModelEntry:
        runtime, entry = Runtime([]), ModelEntry("m")
        runtime._spawn(entry, broken())
        await asyncio.gather(*entry.tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the done callback runs on the next turn
        return entry

    entry = asyncio.run(main())
    assert entry.tasks == set()
    assert "model m: watching or retiring a version failed" in caplog.text
    assert "the watch broke" in caplog.text
