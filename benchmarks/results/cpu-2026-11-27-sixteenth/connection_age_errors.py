"""Evidence (sixteenth session): do a grpc.aio server's connection-age GOAWAYs
(grpc.max_connection_age_ms) cost its clients any call? Two servers share a port; 8 channels
call with a 10 s deadline, 8 with a deadline drawn from LO..HI seconds every 5 ms.

    AGE=300 LO=0.0002 HI=0.002 python connection_age_errors.py client 40

Prints the statuses and the details of every failure other than DEADLINE_EXCEEDED.
"""

import asyncio
import collections
import os
import signal
import subprocess
import sys

import grpc

AGE = int(os.environ.get("AGE", "300"))


async def serve():
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_connection_age_ms", AGE),
            ("grpc.max_connection_age_grace_ms", 5000),
        ]
    )

    async def handler(req, ctx):
        await asyncio.sleep(0.001)
        return req

    h = grpc.method_handlers_generic_handler(
        "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}
    )
    server.add_generic_rpc_handlers((h,))
    port = server.add_insecure_port("127.0.0.1:" + sys.argv[2])
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(5)


async def client(seconds):
    a = subprocess.Popen(
        [sys.executable, __file__, "server", "0"], stdout=subprocess.PIPE, text=True
    )
    port = int(a.stdout.readline())
    b = subprocess.Popen(
        [sys.executable, __file__, "server", str(port)], stdout=subprocess.PIPE, text=True
    )
    b.stdout.readline()
    codes = collections.Counter()
    done = False
    details = collections.Counter()

    async def short(i):
        import random

        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("z.conn", i)])
        m = ch.unary_unary("/t.T/M")
        while not done:
            try:
                await m(
                    b"x",
                    timeout=random.uniform(
                        float(os.environ.get("LO", "0.0002")), float(os.environ.get("HI", "0.002"))
                    ),
                )
                codes["short OK"] += 1
            except grpc.RpcError as e:
                codes["short " + e.code().name] += 1
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    details[e.details()] += 1
            await asyncio.sleep(0.005)
        await ch.close()

    async def caller(i):
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("x.conn", i)])
        m = ch.unary_unary("/t.T/M")
        while not done:
            try:
                await m(b"x", timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as e:
                codes[e.code().name] += 1
        await ch.close()

    tasks = [asyncio.create_task(caller(i)) for i in range(8)] + [
        asyncio.create_task(short(i)) for i in range(8)
    ]
    await asyncio.sleep(seconds)
    done = True
    await asyncio.gather(*tasks)
    a.kill()
    b.kill()
    print(f"age {AGE} ms, {seconds} s:", dict(codes), dict(details))


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve() if sys.argv[1] == "server" else client(float(sys.argv[2])))
