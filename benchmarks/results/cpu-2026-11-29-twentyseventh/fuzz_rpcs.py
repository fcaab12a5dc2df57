"""Throwaway: mutated requests to every RPC of the service (model control on), and large
ModelInfer requests (the relays' ring path) mutated; every answer must be a status a client can
act on, never INTERNAL / UNKNOWN; the server stays up, its log free of ERROR lines."""

import asyncio
import collections
import random
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import build_identity_onnx, build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

SVC = "/inference.GRPCInferenceService/"
NAMES = ["mlp_onnx", "identity", "", "nope", "x" * 3000, "é", "../mlp_onnx", "mlp_onnx\x00"]
VERSIONS = ["", "1", "2", "-1", "abc", "9" * 30]


def rand_params(m, rng):
    for _ in range(rng.randrange(4)):
        key = rng.choice(["version", "rollback", "unload_dependents", "config", "file:a", "zz", ""])
        p = m[key]
        c = rng.randrange(5)
        if c == 0:
            p.string_param = rng.choice(["", "1", "2", "true", "false", "x" * 500])
        elif c == 1:
            p.bool_param = rng.random() < 0.5
        elif c == 2:
            p.int64_param = rng.choice([-1, 0, 1, 2**62])
        elif c == 3 and hasattr(p, "bytes_param"):
            p.bytes_param = b"\x00\xff"
        else:
            p.string_param = "2"


def requests(rng):
    """(method, serialised request) for a random non-ModelInfer RPC."""
    kind = rng.randrange(9)
    if kind == 0:
        return "ModelMetadata", pb.ModelMetadataRequest(
            name=rng.choice(NAMES), version=rng.choice(VERSIONS)
        )
    if kind == 1:
        return "ModelConfig", pb.ModelConfigRequest(
            name=rng.choice(NAMES), version=rng.choice(VERSIONS)
        )
    if kind == 2:
        return "ModelStatistics", pb.ModelStatisticsRequest(
            name=rng.choice(NAMES), version=rng.choice(VERSIONS)
        )
    if kind == 3:
        return "ModelReady", pb.ModelReadyRequest(
            name=rng.choice(NAMES), version=rng.choice(VERSIONS)
        )
    if kind == 4:
        return "RepositoryIndex", pb.RepositoryIndexRequest(
            repository_name=rng.choice(["", "x", "é"]), ready=rng.random() < 0.5
        )
    if kind == 5:
        r = pb.RepositoryModelLoadRequest(
            repository_name=rng.choice(["", "r"]), model_name=rng.choice(NAMES[:4])
        )
        rand_params(r.parameters, rng)
        return "RepositoryModelLoad", r
    if kind == 6:
        r = pb.RepositoryModelUnloadRequest(
            repository_name="", model_name=rng.choice(["nope", "", "é"])
        )
        rand_params(r.parameters, rng)
        return "RepositoryModelUnload", r
    if kind == 7:
        return rng.choice(["ServerLive", "ServerReady", "ServerMetadata"]), pb.ServerLiveRequest()
    return rng.choice(
        [
            "CudaSharedMemoryStatus",
            "SystemSharedMemoryStatus",
            "TraceSetting",
            "LogSettings",
            "SystemSharedMemoryRegister",
            "CudaSharedMemoryRegister",
        ]
    ), pb.ServerLiveRequest()


def large(rng, n):
    r = pb.ModelInferRequest(model_name="identity", id=str(rng.randrange(99)))
    r.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, n])
    r.raw_input_contents.append(np.full(n, 1.5, np.float32).tobytes())
    k = rng.randrange(8)
    if k == 0:
        r.inputs[0].shape[1] = n + 1
    elif k == 1:
        r.raw_input_contents.append(b"x" * 20000)
    elif k == 2:
        r.inputs[0].datatype = "INT32"
    elif k == 3:
        r.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, n])
        r.raw_input_contents.append(r.raw_input_contents[0])
    elif k == 4:
        r.model_name = "nope"
    elif k == 5:
        r.raw_input_contents[0] = r.raw_input_contents[0][:-1]
    data = r.SerializeToString()
    if k == 6:  # byte-level damage
        b = bytearray(data)
        for _ in range(3):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        data = bytes(b)
    elif k == 7:
        data = data[: rng.randrange(len(data))]
    return data, k


BAD = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}


async def run(url, n, seed):
    rng = random.Random(seed)
    stats = collections.Counter()
    bad = []
    async with grpc.aio.insecure_channel(
        url, options=[("grpc.max_send_message_length", 1 << 30)]
    ) as ch:
        for k in range(n):
            method, msg = requests(rng)
            data = msg.SerializeToString()
            if k % 4 == 3 and data:
                b = bytearray(data)
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                data = bytes(b)
            elif k % 4 == 2:
                data = rng.choice(
                    [b"\n\x08mlp", b"\xff" * 5, bytes(rng.getrandbits(8) for _ in range(20))]
                )
            try:
                await ch.unary_unary(SVC + method)(data, timeout=30)
                stats[(method, "OK")] += 1
            except grpc.aio.AioRpcError as e:
                stats[(method, e.code().name)] += 1
                if e.code().name in BAD:
                    bad.append((method, e.code().name, e.details()[:200], data[:80]))
        call = ch.unary_unary(SVC + "ModelInfer")

        async def one():
            data, k = large(rng, rng.choice([5000, 40000, 100000]))
            try:
                await call(data, timeout=30)
                stats[("large", k, "OK")] += 1
            except grpc.aio.AioRpcError as e:
                stats[("large", k, e.code().name)] += 1
                if e.code().name in BAD:
                    bad.append(("large", k, e.code().name, e.details()[:200]))

        for _ in range(n // 8):
            await asyncio.gather(*(one() for _ in range(8)))
    return stats, bad


def main():
    n = int(sys.argv[1])
    frontends = sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_mlp_onnx(repo / "mlp_onnx")
        build_identity_onnx(repo / "identity", types=("FP32",))
        args = ["--model-control"]
        if frontends != "1":
            args += ["--frontends", frontends]
        s = ServerProcess(Path(tmp) / "s.log", repo, args=tuple(args))
        try:
            wait_until(s.ready_over_http, 300, "ready")
            stats, bad = asyncio.run(run(s.url, n, 11))
            for k, v in sorted(stats.items(), key=str):
                print(k, v)
            print("bad:", len(bad))
            for b in bad[:30]:
                print("  ", b)
            print("alive", s.process.poll() is None)
        finally:
            s.stop()
            lines = [
                line for line in s.log().splitlines() if "Traceback" in line or " ERROR " in line
            ]
            print("log ERROR/Traceback lines:", len(lines))
            for line in lines[:20]:
                print("  ", line[:300])


if __name__ == "__main__":
    main()
