"""Throwaway: mutated ModelInfer requests against a running warmserve; every answer must be a
status a client can act on (never INTERNAL / UNKNOWN), the server must stay up and keep
answering good requests right."""

import asyncio
import collections
import random
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import build_identity_onnx, build_image_cnn, build_mlp_onnx
from tests.integration.harness import ServerProcess, wait_until

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
TYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
]
ITEM = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
    "BF16": 2,
}


def good(model: str, rng: random.Random) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, id=f"r{rng.randrange(1000)}")
    rows = rng.choice([1, 2, 3])
    if model == "mlp_onnx":
        x = np.arange(rows * 64, dtype=np.float32).reshape(rows, 64) / 100
        r.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 64])
        r.raw_input_contents.append(x.tobytes())
    elif model == "image_cnn":
        r.inputs.add(name="IMAGE", datatype="UINT8", shape=[rows, 32, 32, 3])
        r.raw_input_contents.append(bytes(rows * 32 * 32 * 3))
    else:
        n = rng.choice([1, 3])
        for t in ["FP32", "FP16", "INT64", "INT32", "UINT8", "BOOL", "BYTES"]:
            r.inputs.add(name=f"IN_{t}", datatype=t, shape=[rows, n])
            if t == "BYTES":
                raw = b"".join(len(b"ab").to_bytes(4, "little") + b"ab" for _ in range(rows * n))
            else:
                raw = bytes(rows * n * ITEM[t])
            r.raw_input_contents.append(raw)
    return r


def mutate(r: pb.ModelInferRequest, rng: random.Random) -> None:
    kind = rng.randrange(22)
    ins = r.inputs
    i = rng.randrange(len(ins)) if len(ins) else 0
    if kind == 0 and len(ins):
        ins[i].datatype = rng.choice([*TYPES, "", "fp32", "FP8", "INT128", "ÄÖ", "x" * 300])
    elif kind == 1 and len(ins):
        del ins[i].shape[:]
        for _ in range(rng.choice([0, 1, 2, 3, 5, 40, 70])):
            ins[i].shape.append(rng.choice([-1, 0, 1, 2, 7, 64, 2**31, 2**40, 2**62, -(2**62)]))
    elif kind == 2 and len(r.raw_input_contents):
        j = rng.randrange(len(r.raw_input_contents))
        data = r.raw_input_contents[j]
        r.raw_input_contents[j] = rng.choice(
            [
                data[: rng.randrange(len(data) + 1)],
                data + bytes(rng.randrange(1, 9)),
                b"",
                bytes(rng.getrandbits(8) for _ in range(min(64, len(data) + 3))),
            ]
        )
    elif kind == 3:
        del r.raw_input_contents[:]  # typed contents of a random field instead
        for t in ins:
            field = rng.choice(
                [
                    "fp32_contents",
                    "int_contents",
                    "int64_contents",
                    "bool_contents",
                    "bytes_contents",
                    "uint_contents",
                    "fp64_contents",
                    "uint64_contents",
                ]
            )
            values = getattr(t.contents, field)
            for _ in range(rng.choice([0, 1, 3, 64, 65])):
                if field == "bytes_contents":
                    values.append(b"x")
                elif field == "bool_contents":
                    values.append(True)
                elif field.startswith("uint"):
                    values.append(rng.randrange(0, 2**31))
                elif field.startswith("fp"):
                    values.append(rng.choice([1.5, float("nan"), float("inf"), 1e300]))
                else:
                    values.append(rng.randrange(-(2**31), 2**31))
    elif kind == 4 and len(ins):
        ins[i].contents.fp32_contents.append(1.0)  # both typed and raw
    elif kind == 5:
        key = rng.choice(
            [
                "timeout",
                "sequence_id",
                "priority",
                "binary_data_output",
                "zz",
                "sequence_start",
                "shared_memory_region",
            ]
        )
        p = r.parameters[key]
        choice = rng.randrange(5)
        if choice == 0:
            p.string_param = rng.choice(["", "10", "abc"])
        elif choice == 1:
            p.bool_param = True
        elif choice == 2:
            p.int64_param = rng.choice([-1, 0, 1, 2**62, -(2**62)])
        elif choice == 3:
            p.double_param = rng.choice([0.5, float("nan"), -1e30])
        else:
            p.uint64_param = rng.choice([0, 5, 2**64 - 1])
    elif kind == 6:
        out = r.outputs.add(name=rng.choice(["OUTPUT0", "OUT_FP32", "LOGITS", "nope", ""]))
        if rng.random() < 0.3:
            out.parameters["classification"].int64_param = 3
        if rng.random() < 0.2:
            out.parameters["shared_memory_region"].string_param = "r"
    elif kind == 7 and len(ins):
        ins[i].parameters["shared_memory_region"].string_param = "r"
    elif kind == 8 and len(ins):
        ins[i].name = rng.choice(["", "nope", "INPUT0", "IN_FP32", "IMAGE", "é" * 10])
    elif kind == 9 and len(ins):  # duplicate an input (and its data)
        ins.add().CopyFrom(ins[i])
        if len(r.raw_input_contents) > i:
            r.raw_input_contents.append(r.raw_input_contents[i])
    elif kind == 10 and len(ins):  # drop an input
        del ins[i]
        if len(r.raw_input_contents) > i:
            del r.raw_input_contents[i]
    elif kind == 11:
        r.model_name = rng.choice(["", "nope", "mlp_onnx", "x" * 5000, "../etc", "mlp_onnx\x00"])
    elif kind == 12:
        r.model_version = rng.choice(["2", "-1", "abc", "1", "0", "99999999999999999999"])
    elif kind == 13:
        r.id = "i" * rng.choice([0, 1, 100000])
    elif kind == 14 and len(ins):  # BYTES with broken length prefixes
        for t, j in zip(ins, range(len(r.raw_input_contents)), strict=False):
            if t.datatype == "BYTES":
                r.raw_input_contents[j] = rng.choice(
                    [
                        b"\xff\xff\xff\x7fab",
                        b"\x02\x00\x00",
                        b"\x00\x00\x00\x00" * 3,
                        b"\x05\x00\x00\x00ab",
                    ]
                )
    elif kind == 15 and len(ins):  # BOOL bytes that are not 0/1
        for t, j in zip(ins, range(len(r.raw_input_contents)), strict=False):
            if t.datatype == "BOOL":
                r.raw_input_contents[j] = bytes([rng.randrange(2, 256)]) * len(
                    r.raw_input_contents[j]
                )
    elif kind == 16 and len(ins):  # many rows
        rows = rng.choice([0, 9, 33, 65, 1000])
        for t, j in zip(ins, range(len(r.raw_input_contents)), strict=False):
            if len(t.shape):
                per = max(1, len(r.raw_input_contents[j]) // max(1, t.shape[0]))
                t.shape[0] = rows
                r.raw_input_contents[j] = bytes(per * rows)
    elif kind == 17:
        r.raw_input_contents.append(b"extra")
    elif kind == 18 and len(ins):  # rows disagree between inputs
        ins[i].shape[0] = ins[i].shape[0] + 1 if len(ins[i].shape) else 1
    elif kind == 19:
        del ins[:]
        del r.raw_input_contents[:]
    elif kind == 20 and len(ins):
        ins[i].parameters["binary_data_size"].int64_param = 7
    else:
        r.parameters["timeout"].int64_param = rng.choice([1, 10, 100000])


def byte_mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(3)
        if op == 0 and b:
            k = rng.randrange(len(b))
            b[k] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[rng.randrange(len(b)) :]
        else:
            k = rng.randrange(len(b) + 1)
            b[k:k] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 8)))
    return bytes(b)


BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


async def run(url: str, n: int, seed: int) -> tuple[collections.Counter, list]:
    rng = random.Random(seed)
    statuses: collections.Counter = collections.Counter()
    bad = []
    async with grpc.aio.insecure_channel(
        url, options=[("grpc.max_send_message_length", 1 << 30)]
    ) as ch:
        call = ch.unary_unary(METHOD)
        models = ["mlp_onnx", "identity", "image_cnn"]

        async def one(k: int) -> None:
            model = rng.choice(models)
            r = good(model, rng)
            if k % 3 == 2:
                data = byte_mutate(r.SerializeToString(), rng)
            else:
                for _ in range(rng.randrange(1, 4)):
                    mutate(r, rng)
                data = r.SerializeToString()
            try:
                await call(data, timeout=10)
                statuses["OK"] += 1
            except grpc.aio.AioRpcError as e:
                statuses[e.code().name] += 1
                if e.code() in BAD or (e.code() == grpc.StatusCode.UNAVAILABLE):
                    bad.append((e.code().name, e.details()[:300], data[:200]))

        for start in range(0, n, 16):
            await asyncio.gather(*(one(k) for k in range(start, min(n, start + 16))))
            if start % 512 == 0:  # a good call still gets its right answer
                r = good("mlp_onnx", rng)
                reply = pb.ModelInferResponse.FromString(
                    await call(r.SerializeToString(), timeout=10)
                )
                assert reply.outputs[0].name, reply
        # streams: mutated requests on one stream, each answered, the stream going on
        stream = ch.stream_stream(STREAM)
        reqs = []
        for k in range(300):
            r = good(rng.choice(models), rng)
            if k % 3 == 1:
                mutate(r, rng)
            data = r.SerializeToString()
            if k % 3 == 2:
                data = byte_mutate(data, rng)
            reqs.append(data)

        async def gen():
            for d in reqs:
                yield d

        answers = 0
        kinds = collections.Counter()
        try:
            async for msg in stream(gen(), timeout=60):
                answers += 1
                m = pb.ModelStreamInferResponse.FromString(msg)
                kinds["error" if m.error_message else "ok"] += 1
                if m.error_message and (
                    "INTERNAL" in m.error_message or "trace id" in m.error_message
                ):
                    bad.append(("STREAM", m.error_message[:300], b""))
                if m.error_message and kinds["error"] <= 3:
                    print("stream error example:", m.error_message[:200])
        except grpc.aio.AioRpcError as e:
            bad.append(("STREAM ENDED", e.code().name, e.details()[:300]))
        statuses["stream_answers"] = answers
        statuses.update({f"stream_{k}": v for k, v in kinds.items()})
    return statuses, bad


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    frontends = sys.argv[2] if len(sys.argv) > 2 else "1"
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_mlp_onnx(repo / "mlp_onnx")
        build_identity_onnx(repo / "identity")
        build_image_cnn(
            repo / "image_cnn",
            inputs=[{"name": "IMAGE", "datatype": "UINT8", "shape": [32, 32, 3]}],
        )
        args = ("--frontends", frontends) if frontends != "1" else ()
        s = ServerProcess(Path(tmp) / "s.log", repo, args=args)
        try:
            wait_until(s.ready_over_http, 300, "ready")
            statuses, bad = asyncio.run(run(s.url, n, 7))
            print(dict(statuses))
            print("bad:", len(bad))
            for b in bad[:40]:
                print("  ", b)
            alive = s.process.poll() is None
            print("alive", alive)
        finally:
            s.stop()
            log = s.log()
            lines = [
                line
                for line in log.splitlines()
                if "Traceback" in line or " ERROR " in line or "lost" in line
            ]
            print("log ERROR/Traceback/lost lines:", len(lines))
            for line in lines[:30]:
                print("  ", line[:300])


if __name__ == "__main__":
    main()
