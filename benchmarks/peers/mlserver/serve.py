"""Start Seldon MLServer on the demo ONNX model, in MLServer's own venv (benchmarks/.peers/).

    benchmarks/.peers/mlserver/bin/python benchmarks/peers/mlserver/serve.py \
        --onnx model.onnx --grpc-port 18200 --workers 0 --batch 0

Writes MLServer's settings.json and model-settings.json into a new folder under $TMPDIR (the
caller removes it), then replaces itself with `mlserver start` (so the caller's pid is
MLServer's). `--workers 0` is MLServer's in-process setting; `--workers N` runs inference in N
worker processes. `--batch N` (N > 1) turns adaptive batching on, up to N requests per batch,
waiting at most `--batch-wait-ms`.
Everything listens on 127.0.0.1; the REST port is a free one; metrics are off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=0, help="parallel_workers (0: in-process)")
    parser.add_argument("--batch", type=int, default=0, help="max_batch_size (> 1: batching on)")
    parser.add_argument("--batch-wait-ms", type=float, default=1.0, help="max_batch_time")
    parser.add_argument("--name", default="mlp_onnx")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="mlserver-peer-"))
    model = folder / args.name
    model.mkdir()
    shutil.copy(HERE / "onnx_model.py", model / "onnx_model.py")
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "grpc_port": args.grpc_port,
        "http_port": free_port(),
        "metrics_endpoint": None,
        "parallel_workers": args.workers,
        "load_models_at_startup": True,
        "model_repository_root": str(folder),
    }
    model_settings: dict[str, object] = {
        "name": args.name,
        "implementation": "onnx_model.OnnxModel",
        "parameters": {"uri": str(args.onnx.resolve()), "version": "1"},
    }
    if args.batch > 1:
        model_settings["max_batch_size"] = args.batch
        model_settings["max_batch_time"] = args.batch_wait_ms / 1e3
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    (model / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    print(f"mlserver peer settings in {folder}", flush=True)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(model), os.environ.get("PYTHONPATH", "")])
    )
    mlserver = Path(sys.executable).with_name("mlserver")
    os.execve(mlserver, [str(mlserver), "start", str(folder)], env)


if __name__ == "__main__":
    main()
