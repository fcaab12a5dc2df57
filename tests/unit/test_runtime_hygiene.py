"""What the runtime keeps of calls that are over: nothing that grows with every call."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys

import pytest

from serve.errors import ModelNotFoundError
from serve.runtime import Runtime


def test_control_calls_for_models_that_are_not_loaded_leave_nothing_behind(caplog):
    caplog.set_level(logging.CRITICAL, logger="serve")  # (captured log lines hold the names)

    async def main() -> tuple[list[int], list[int]]:
        runtime = Runtime([])
        names = [f"absent-{i}" for i in range(20)]  # (say, a cleanup job unloading by name)
        for name in names:
            with pytest.raises(ModelNotFoundError):
                await runtime.unload(name)
            with pytest.raises(ModelNotFoundError):
                await runtime.rollback(name, keep_previous_s=0)
        del name
        await asyncio.sleep(0)  # (the control tasks' done callbacks)
        gc.collect()
        unused = ["".join(reversed(name)) for name in names]  # held by nothing else
        return [sys.getrefcount(s) for s in names], [sys.getrefcount(s) for s in unused]

    held, unused = asyncio.run(main())
    assert held == unused  # no lock (or anything) kept per name ever asked for
