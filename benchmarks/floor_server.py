"""The floor: a bare single-process grpc.aio Open Inference Protocol server that computes the
model in its own handler (ONNX Runtime, in-process, no batching, no workers). It is what Python
gRPC can do on this machine; warmserve's overhead is measured against it.

    python -m benchmarks.floor_server --model-dir DIR --port 18100

Serves just enough of the protocol for perf_analyzer and the load generator: ServerLive,
ServerMetadata,
ServerReady, ModelReady, ModelMetadata, ModelConfig, ModelStatistics (no counts) and ModelInfer
(raw contents, FP32 inputs of the demo MLP).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import uvloop

from serve.config import load_model_dir
from serve.frontend import metadata
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.pb import grpc_service_pb2_grpc as pb_grpc


class FloorServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, model_dir: Path) -> None:
        self.model = load_model_dir(model_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.model.model_path), options, providers=["CPUExecutionProvider"]
        )
        self.input = self.model.inputs[0]
        self.output = self.model.outputs[0]

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="floor", version="0")

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return metadata.model_metadata(self.model, [self.model.version])

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return metadata.model_config(self.model)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        stats = pb.ModelStatistics(name=self.model.name, version=self.model.version)
        return pb.ModelStatisticsResponse(model_stats=[stats])  # perf_analyzer asks; no counts

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        tensor = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(tensor.shape)
        (y,) = self.session.run([self.output.name], {self.input.name: x})
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
        out = response.outputs.add()
        out.name = self.output.name
        out.datatype = "FP32"
        out.shape.extend(y.shape)
        response.raw_output_contents.append(y.tobytes())
        return response


async def serve(model_dir: Path, host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(FloorServicer(model_dir), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor server listening on {host}:{port}", flush=True)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a model folder (model.toml)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.model_dir, args.host, args.port))


if __name__ == "__main__":
    main()
