"""The floor: a bare single-process grpc.aio Open Inference Protocol server that computes the
model in its own handler (ONNX Runtime, in-process, no batching, no workers). It is what Python
gRPC can do on this machine; warmserve's overhead is measured against it.

    python -m benchmarks.floor_server --model-dir DIR --port 18100
    python -m benchmarks.floor_server --model-dir DIR --port 18100 --hop

With ``--echo N`` there is no model at all (the "gRPC floor"): each call is parsed and answered
with N zero bytes as the model's first output. It is what one Python gRPC process can take here
with these payloads, whatever the model costs (the GPU benchmark runs it beside warmserve).

With ``--hop`` the model runs in a second process instead (the "hop floor"): the handler writes
the raw input bytes to a forked child over a socketpair and awaits the raw output bytes; the child
runs ONNX Runtime in a blocking loop. No batching, validation, shared memory or bookkeeping: the
least any design that keeps the model out of the serving process can cost, in Python, here.

Serves just enough of the protocol for perf_analyzer and the load generator: ServerLive,
ServerMetadata,
ServerReady, ModelReady, ModelMetadata, ModelConfig, ModelStatistics (no counts) and ModelInfer
(raw contents, FP32 inputs of the demo MLP).

It registers its service as warmserve does (``add_inference_service``: only the inference methods
as gRPC registered methods, which spares grpc.aio's loop a wait over one task per method on every
call), so the floor stays the least Python gRPC can cost here, not a handicapped one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import socket
import struct
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
from serve.frontend.server import add_inference_service

LENGTH = struct.Struct("<I")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _hop_child(sock: socket.socket, model_path: Path, input_name: str, output_name: str) -> None:
    """The model process: length-prefixed FP32 rows of 64 in, the output bytes back, in order."""
    session = _session(model_path)
    reader = sock.makefile("rb")
    while True:
        header = reader.read(LENGTH.size)
        if len(header) < LENGTH.size:
            return
        (length,) = LENGTH.unpack(header)
        x = np.frombuffer(reader.read(length), dtype=np.float32).reshape(-1, 64)
        (y,) = session.run([output_name], {input_name: x})
        data = y.tobytes()
        sock.sendall(LENGTH.pack(len(data)) + data)


class _HopLink(asyncio.Protocol):
    """The serving side of the hop: replies arrive in the order requests were sent."""

    def __init__(self) -> None:
        self.waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self.transport: Any = None
        self._buffer = bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buffer)
            if len(self._buffer) < LENGTH.size + length:
                return
            reply = bytes(self._buffer[LENGTH.size : LENGTH.size + length])
            del self._buffer[: LENGTH.size + length]
            self.waiting.popleft().set_result(reply)

    async def call(self, data: bytes) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(LENGTH.pack(len(data)) + data)
        return await future


class FloorServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, model_dir: Path, hop: _HopLink | None = None, echo: int = 0) -> None:
        self.model = load_model_dir(model_dir)
        self.hop = hop
        self.echo = bytes(echo)
        if hop is not None or echo:
            self.input, self.output = self.model.inputs[0], self.model.outputs[0]
            return
        self.session = _session(self.model.model_path)
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

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        """Each request on the stream answered in turn, as ModelInfer answers it (what a bare
        Python gRPC server does with streaming clients)."""
        async for request in request_iterator:
            response = await self.ModelInfer(request, context)
            yield pb.ModelStreamInferResponse(infer_response=response)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        tensor = request.inputs[0]
        if self.echo:
            data, shape = self.echo, [tensor.shape[0], len(self.echo) // 4 // tensor.shape[0]]
        elif self.hop is not None:
            data = await self.hop.call(request.raw_input_contents[0])
            shape = [tensor.shape[0], len(data) // 4 // tensor.shape[0]]
        else:
            x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
            (y,) = self.session.run([self.output.name], {self.input.name: x.reshape(tensor.shape)})
            data, shape = y.tobytes(), list(y.shape)
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )  # (perf_analyzer --streaming matches answers to requests by id)
        out = response.outputs.add()
        out.name = self.output.name
        out.datatype = "FP32"
        out.shape.extend(shape)
        response.raw_output_contents.append(data)
        return response


async def serve(model_dir: Path, host: str, port: int, hop: bool, echo: int = 0) -> None:
    link = None
    if hop:
        model = load_model_dir(model_dir)
        ours, theirs = socket.socketpair()
        if os.fork() == 0:  # the model process; it exits when the server closes the socket
            ours.close()
            _hop_child(theirs, model.model_path, model.inputs[0].name, model.outputs[0].name)
            os._exit(0)
        theirs.close()
        _, link = await asyncio.get_running_loop().connect_accepted_socket(_HopLink, sock=ours)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_inference_service(FloorServicer(model_dir, link, echo), server)
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
    parser.add_argument("--hop", action="store_true", help="run the model in a second process")
    parser.add_argument("--echo", type=int, default=0, help="no model: answer this many bytes")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.model_dir, args.host, args.port, args.hop, args.echo))


if __name__ == "__main__":
    main()
