"""The worker's own Python per batch, hot: Worker.run_batch and frame() on the demo MLP's one-row
batch, in a tight loop in this process (no sockets, caches warm), against a bare session.run
on the same array.

    PYTHONPATH=. python .../worker_micro.py
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from serve.config import load_model_dir
from serve.pool.arena import Arena, create_memfd
from serve.pool.messages import IPC_VERSION, Init, RunBatch, frame
from serve.protocol.datatypes import Datatype
from serve.testing.models import build_mlp_onnx
from serve.worker.main import Channel, Worker

BATCHES = 20000
SLOTS, SLOT_BYTES = 4, 1 << 16


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        build_mlp_onnx(Path(tmp) / "m", name="m")
        model = load_model_dir(Path(tmp) / "m")
        fd_in = create_memfd("in", SLOTS * SLOT_BYTES)
        fd_out = create_memfd("out", SLOTS * SLOT_BYTES)
        _, child = socket.socketpair()
        init = Init(IPC_VERSION, model, "w", "cpu", 1, SLOTS, SLOT_BYTES, None)
        worker = Worker(Channel(child), init, fd_in, fd_out)
        worker.warm_up()
        x = np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)
        name = model.inputs[0].name
        refs = Arena(fd_in, SLOTS, SLOT_BYTES).write(0, [(name, Datatype.FP32, [x])])
        message = RunBatch(1, 0, 1, refs)
        session = worker.backend._session  # type: ignore[attr-defined]
        outputs = worker.backend._output_names  # type: ignore[attr-defined]
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(BATCHES):
                session.run(outputs, {name: x})
            bare = (time.perf_counter() - start) / BATCHES * 1e6
            start = time.perf_counter()
            for _ in range(BATCHES):
                frame(worker.run_batch(message))
            full = (time.perf_counter() - start) / BATCHES * 1e6
            print(f"session.run {bare:5.1f} µs, run_batch + frame {full:5.1f} µs")


if __name__ == "__main__":
    main()
