"""Evidence (eighteenth session): what one message of a ModelStreamInfer stream costs in
answer_concurrently, before (5ee5a9e) and after streams learnt to close at a stop. One stream
at concurrency 1 (send a request, await its answer) with instant answers, on uvloop, in-process:
µs per message, three ways alternated (old; new with a closing event; new without).

    PYTHONPATH=. python benchmarks/results/cpu-2026-11-27-eighteenth/stream_micro.py
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import uvloop

BASE = "5ee5a9e"
MESSAGES = 20_000


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _per_message_us(module: ModuleType, closing: bool) -> float:
    queue: asyncio.Queue[int | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[int]:
        while (item := await queue.get()) is not None:
            yield item

    async def answer(request: int) -> int:
        return request

    extra: dict[str, Any] = {"closing": asyncio.Event()} if closing else {}
    stream = module.answer_concurrently(requests(), answer, **extra)
    started = time.perf_counter()
    for i in range(MESSAGES):
        queue.put_nowait(i)
        await anext(stream)
    queue.put_nowait(None)
    async for _ in stream:
        pass
    return (time.perf_counter() - started) / MESSAGES * 1e6


async def _main(old: ModuleType, new: ModuleType) -> None:
    for _ in range(5):
        a = await _per_message_us(old, False)
        b = await _per_message_us(new, True)
        c = await _per_message_us(new, False)
        print(f"old {a:.2f} µs  new+closing {b:.2f} µs  new {c:.2f} µs", flush=True)


def main() -> None:
    source = subprocess.run(
        ["git", "show", f"{BASE}:serve/frontend/streams.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "streams_old.py"
        path.write_text(source)
        old = _load(path, "streams_old")
        new = _load(Path("serve/frontend/streams.py"), "streams_new")
        uvloop.run(_main(old, new))


if __name__ == "__main__":
    main()
