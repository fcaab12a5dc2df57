"""What grpc.aio's server waits on for each call: asyncio.wait wrapped in a floor server (run
in this process), 2 s of c=1 calls, then the waits counted by the tasks they waited on."""

from __future__ import annotations

import asyncio
import collections
import tempfile
from pathlib import Path
from typing import Any

import uvloop

from benchmarks import floor_server, loadgen
from benchmarks.compare import MODEL
from serve.testing.models import build_mlp_onnx

_wait = asyncio.wait
seen: collections.Counter[tuple[int, tuple[tuple[str, int], ...], str]] = collections.Counter()


async def _counted(tasks: Any, *args: Any, **kwargs: Any) -> Any:
    names = collections.Counter(t.get_coro().__qualname__ for t in tasks)
    seen[(len(tasks), tuple(sorted(names.items())), str(kwargs))] += 1
    return await _wait(tasks, *args, **kwargs)


asyncio.wait = _counted  # type: ignore[assignment]


async def main(model_dir: Path, port: int) -> None:
    server = asyncio.create_task(floor_server.serve(model_dir, "127.0.0.1", port, False))
    await asyncio.sleep(2)  # (a throwaway: the server is up well within it)
    url = f"127.0.0.1:{port}"
    run = lambda: loadgen.run(url, MODEL, concurrency=1, seconds=2)  # noqa: E731
    await asyncio.get_running_loop().run_in_executor(None, run)
    for key, count in seen.most_common(5):
        print(count, key)
    server.cancel()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        build_mlp_onnx(Path(tmp) / MODEL)
        uvloop.run(main(Path(tmp) / MODEL, 18777))
