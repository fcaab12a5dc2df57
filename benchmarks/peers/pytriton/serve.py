"""Start NVIDIA PyTriton (the real Triton core, Python model) on the demo ONNX model, in
PyTriton's own venv (benchmarks/.peers/).

    benchmarks/.peers/pytriton/bin/python benchmarks/peers/pytriton/serve.py \
        --onnx model.onnx --grpc-port 18300 --batch-delay-us 100

Triton's gRPC frontend takes the Open Inference Protocol calls; its Python backend stub hands
each batch over to the infer function below, in this process, which runs ONNX Runtime (CPU, one
intra-op thread). Dynamic batching is on (max_batch_size 64, `--batch-delay-us` queue delay)
unless `--no-batching` (no batch dimension: one request per call of the infer function);
`--instances N` binds N copies of the infer function (Triton runs them concurrently).
Everything listens on 127.0.0.1 (HTTP and metrics on free ports). SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def use_own_libpython() -> None:
    """Triton's Python backend stub links libpython3.X.so by name; the first one the loader finds
    may be another build (Debian's /usr/lib) than this venv's interpreter (e.g. pyenv's), whose
    stdlib then fails inside the stub. Put this interpreter's LIBDIR first for Triton's children.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir, sysconfig.get_config_var("LDLIBRARY") or "").exists():
        paths = [libdir, *os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)]
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)


def onnx_infer(path: Path, batching: bool) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name

    @batch  # type: ignore[untyped-decorator]
    def infer_batch(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        (y,) = session.run([name_out], {name_in: inputs["INPUT0"]})
        return {"OUTPUT0": y}

    def infer_each(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """Batching off: Triton hands over single requests, each with its full [n, 64] shape."""
        return [{"OUTPUT0": session.run([name_out], {name_in: r["INPUT0"]})[0]} for r in requests]

    return infer_batch if batching else infer_each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--name", default="mlp_onnx")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--batch-delay-us", type=int, default=0, help="max_queue_delay")
    parser.add_argument("--no-batching", action="store_true")
    parser.add_argument("--instances", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # serve() stops on KeyboardInterrupt
    use_own_libpython()

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=free_port(),
        metrics_address="127.0.0.1",
        metrics_port=free_port(),
        allow_metrics=False,
        allow_gpu_metrics=False,
        allow_cpu_metrics=False,
        exit_timeout_secs=5,
    )
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    if args.no_batching:  # no batch dimension in the config: the shapes carry it, as -1
        model_config = ModelConfig(batching=False)
        shape_in, shape_out = (-1, 64), (-1, 10)
    else:
        batcher = DynamicBatcher(max_queue_delay_microseconds=args.batch_delay_us)
        model_config = ModelConfig(max_batch_size=args.max_batch, batcher=batcher)
        shape_in, shape_out = (64,), (10,)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=[onnx_infer(args.onnx, not args.no_batching) for _ in range(args.instances)],
            inputs=[Tensor(name="INPUT0", dtype=np.float32, shape=shape_in)],
            outputs=[Tensor(name="OUTPUT0", dtype=np.float32, shape=shape_out)],
            config=model_config,
            strict=False,
        )
        print(f"pytriton peer listening on 127.0.0.1:{args.grpc_port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
