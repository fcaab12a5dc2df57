import asyncio
import collections
import random
import sys
import tempfile
from pathlib import Path

from tests.integration.harness import ServerProcess, wait_until


async def one(port, data, rng):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        w.write(data)
        if rng.random() < 0.5:
            w.write_eof()
        await w.drain()
        got = await asyncio.wait_for(r.read(), 12)
        w.close()
        return got.split(b"\r\n", 1)[0][:40] or b"<closed>"
    except Exception as e:
        return type(e).__name__.encode()


async def main(port, n):
    rng = random.Random(3)
    paths = [
        "/v2/health/ready",
        "/v2/health/live",
        "/metrics",
        "/v2/models/mlp_onnx/ready",
        "/v2/models/mlp_onnx/versions/1/ready",
        "/warmserve/models/mlp_onnx/latency",
        "/warmserve/models/%2e%2e/latency",
        "/v2/models/\xe9/ready",
        "/" * 5000,
        "",
        "*",
        "/v2/models/mlp_onnx/versions//ready",
        "/v2/health/ready?x=" + "a" * 9000,
    ]
    c = collections.Counter()
    for _ in range(n // 20):
        batch = []
        for _ in range(20):
            k = rng.randrange(6)
            if k == 0:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
            elif k == 1:
                method = rng.choice(["GET", "HEAD", "POST", "PUT", "BREW", ""])
                path = rng.choice(paths)
                data = f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(
                    "utf-8", "surrogatepass"
                )
            elif k == 2:
                data = (
                    b"GET /v2/health/ready HTTP/1.1\r\n"
                    + b"X: "
                    + b"a" * rng.choice([10, 9000, 70000])
                    + b"\r\n\r\n"
                )
            elif k == 3:
                data = b"GET /v2/health/ready"  # no end of head
            elif k == 4:
                data = b"GET /v2/health/ready HTTP/1.1\r\n\r\n" * 3
            else:
                data = b"GET " + bytes(rng.getrandbits(8) for _ in range(30)) + b" HTTP/1.0\r\n\r\n"
            batch.append(one(port, data, rng))
        for r in await asyncio.gather(*batch):
            c[r] += 1
    # a good probe still answers
    print(await one(port, b"GET /v2/health/ready HTTP/1.1\r\n\r\n", random.Random(0)))
    return c


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        s = ServerProcess(Path(tmp) / "s.log", None)
        try:
            wait_until(s.ready_over_http, 300, "ready")
            c = asyncio.run(main(s.http_port, int(sys.argv[1])))
            for k, v in c.most_common():
                print(v, k)
            print("alive", s.process.poll() is None)
        finally:
            s.stop()
            lines = [
                line
                for line in s.log().splitlines()
                if "Traceback" in line or " ERROR " in line or "WARNING" in line
            ]
            print("log lines:", len(lines))
            [print("  ", line[:250]) for line in lines[:15]]
