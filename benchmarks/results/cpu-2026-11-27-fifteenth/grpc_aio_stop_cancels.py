"""Evidence (fifteenth session): a grpc.aio server stopped with a grace period under load
cancels the calls that reach it in that instant.

    python grpc_aio_stop_cancels.py client

Two servers share a port (SO_REUSEPORT), 16 callers on their own connections; one server gets
SIGTERM and stops with server.stop(5). Prints the callers' statuses.
"""

import asyncio
import collections
import signal
import subprocess
import sys
import threading
import time

import grpc


async def serve():

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])

    async def handler(req, ctx):
        await asyncio.sleep(0.002)
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


def main():
    if sys.argv[1] == "server":
        import uvloop

        uvloop.run(serve())
        return
    a = subprocess.Popen(
        [sys.executable, __file__, "server", "0"], stdout=subprocess.PIPE, text=True
    )
    port = int(a.stdout.readline())
    b = subprocess.Popen(
        [sys.executable, __file__, "server", str(port)], stdout=subprocess.PIPE, text=True
    )
    b.stdout.readline()
    codes = collections.Counter()
    stop = threading.Event()

    def caller(i):
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("x.conn", i)])
        m = ch.unary_unary("/t.T/M")
        while not stop.is_set():
            try:
                m(b"x", timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as e:
                codes[e.code().name] += 1

    ts = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    [t.start() for t in ts]
    time.sleep(2)
    a.send_signal(signal.SIGTERM)
    a.wait()
    time.sleep(2)
    stop.set()
    [t.join() for t in ts]
    b.kill()
    print(dict(codes))


if __name__ == "__main__":
    main()
