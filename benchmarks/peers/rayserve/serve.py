"""Start Ray Serve on the demo ONNX model, in Ray Serve's own venv (benchmarks/.peers/).

    benchmarks/.peers/rayserve/bin/python benchmarks/peers/rayserve/serve.py \
        --onnx model.onnx --grpc-port 18400 --batch 16 --batch-wait-ms 1

Starts a local Ray instance in this process (2 CPUs, dashboard off, small object store, session
files under $TMPDIR, which the caller removes), then Serve with its gRPC proxy on --grpc-port,
serving the Open Inference Protocol service inference.GRPCInferenceService (the generated code
of tritonclient[grpc]: the same public proto). One application, one replica of the deployment
below: ServerLive, ServerReady, ModelReady, ModelMetadata and ModelInfer, the model run by ONNX
Runtime on the CPU with one intra-op thread. `--batch N` (N > 1) puts ModelInfer behind
@serve.batch (up to N requests per batch, waiting at most `--batch-wait-ms`); otherwise each
request runs on its own. `--max-ongoing` is the replica's max_ongoing_requests (Serve's default
of 5 would cap batches and queue the rest in the proxy). Access logs are off.

Serve's gRPC proxy picks the application from an "application" metadata key, but with a single
application it routes every call there, so stock Open Inference Protocol clients (no metadata)
reach it. The application needs a route prefix ("/") even so: without one it has no endpoint and
the gRPC proxy cannot reach it either. Serve's HTTP proxy listens on 127.0.0.1 (a free port); its
gRPC proxy has no host setting and listens on every interface, as Ray's own services do.

Stays in the foreground and prints a line once ServerReady answers through the gRPC proxy.
SIGTERM shuts Ray down. Ray's GCS, raylet and agents are in this process group; its worker
processes (Serve's controller, proxy and replica) lead groups of their own in this session and
exit when the raylet goes, so a SIGKILL to this group stops them too.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions
from ray.serve.schema import LoggingConfig
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
SERVICER = "tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@serve.deployment(ray_actor_options={"num_cpus": 1}, num_replicas=1)
class OnnxMLP:
    """The demo MLP behind the Open Inference Protocol methods, one request proto in, one
    response proto out (Serve's gRPC proxy calls the method named like the gRPC method)."""

    def __init__(self, onnx: str, name: str, batch: int, batch_wait_s: float) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0]
        self._output = self._session.get_outputs()[0]
        self._name = name
        self._batching = batch > 1
        if self._batching:
            self._infer_batch.set_max_batch_size(batch)
            self._infer_batch.set_batch_wait_timeout_s(batch_wait_s)

    def _run(self, x: np.ndarray) -> np.ndarray:
        (y,) = self._session.run([self._output.name], {self._input.name: x})
        return y  # type: ignore[no-any-return]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.001)  # type: ignore[untyped-decorator]
    async def _infer_batch(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Stack the queued requests' rows, run once, hand each request its own rows back."""
        y = self._run(np.concatenate(xs) if len(xs) > 1 else xs[0])
        return np.split(y, np.cumsum([len(x) for x in xs])[:-1])

    async def ServerLive(self, request: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any) -> Any:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any) -> Any:
        return pb.ModelReadyResponse(ready=request.name == self._name)

    async def ModelMetadata(self, request: Any, grpc_context: Any) -> Any:
        if request.name != self._name:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown model {request.name!r}")
            return pb.ModelMetadataResponse()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self._name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[tensor(name=self._input.name, datatype="FP32", shape=[-1, 64])],
            outputs=[tensor(name=self._output.name, datatype="FP32", shape=[-1, 10])],
        )

    async def ModelInfer(self, request: Any, grpc_context: Any) -> Any:
        error = self._invalid(request)
        if error:
            grpc_context.set_code(
                grpc.StatusCode.NOT_FOUND if "model" in error else grpc.StatusCode.INVALID_ARGUMENT
            )
            grpc_context.set_details(error)
            return pb.ModelInferResponse()
        tensor = request.inputs[0]
        if request.raw_input_contents:
            x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
        else:
            x = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
        x = x.reshape(tuple(tensor.shape))
        y = await self._infer_batch(x) if self._batching else self._run(x)
        response = pb.ModelInferResponse(model_name=self._name, model_version="1", id=request.id)
        response.outputs.add(name=self._output.name, datatype="FP32", shape=list(y.shape))
        response.raw_output_contents.append(np.ascontiguousarray(y, dtype=np.float32).tobytes())
        return response

    def _invalid(self, request: Any) -> str:
        if request.model_name != self._name:
            return f"unknown model {request.model_name!r}"
        if len(request.inputs) != 1:
            return "expected one input"
        tensor = request.inputs[0]
        if tensor.name != self._input.name or tensor.datatype != "FP32":
            return f"expected an FP32 input named {self._input.name}"
        if len(tensor.shape) != 2 or tensor.shape[1] != 64 or tensor.shape[0] < 1:
            return f"expected shape [N, 64], got {list(tensor.shape)}"
        size = int(tensor.shape[0]) * 64 * 4
        if request.raw_input_contents and len(request.raw_input_contents[0]) != size:
            return "raw_input_contents does not match the shape"
        return ""


def wait_serving(port: int, timeout: float = 60.0) -> None:
    """Until ServerReady answers through the gRPC proxy (the route table fills after run())."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                    return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--name", default="mlp_onnx")
    parser.add_argument("--batch", type=int, default=0, help="max_batch_size (> 1: @serve.batch)")
    parser.add_argument("--batch-wait-ms", type=float, default=1.0, help="batch_wait_timeout_s")
    parser.add_argument("--max-ongoing", type=int, default=64, help="max_ongoing_requests")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may schedule on")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's processes (the gRPC proxy, the replica) import grpc_service_pb2.py from here: see there.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
    )
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # after ray.init, which sets its own
    try:
        serve.start(
            http_options=HTTPOptions(host="127.0.0.1", port=free_port()),
            grpc_options=gRPCOptions(
                port=args.grpc_port, grpc_servicer_functions=[SERVICER], enable_reflection=False
            ),
            logging_config=LoggingConfig(log_level="WARNING", enable_access_log=False),
        )
        # @serve.deployment made OnnxMLP a Deployment; mypy still sees the class
        app = OnnxMLP.options(max_ongoing_requests=args.max_ongoing).bind(  # type: ignore[attr-defined]
            str(args.onnx.resolve()), args.name, args.batch, args.batch_wait_ms / 1e3
        )
        serve.run(app, name="mlp")
        wait_serving(args.grpc_port)
        print(f"rayserve peer listening on 127.0.0.1:{args.grpc_port}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
