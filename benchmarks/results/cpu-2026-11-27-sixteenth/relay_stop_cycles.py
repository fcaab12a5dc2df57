"""Evidence (sixteenth session): two grpc.aio servers share a port (SO_REUSEPORT); they are
stopped in turn (SIGTERM) and started again, over and over, while 16 grpc.aio channels call at
full rate (the handler takes ~1 ms). Prints each cycle that failed a call, then the totals.

    MODE=plain SLEEP=0.001 python relay_stop_cycles.py client 60   # server.stop(5) at once
    MODE=drain SLEEP=0.001 python relay_stop_cycles.py client 60   # warmserve's relay drain first

MODE=drain: the servers send each connection a GOAWAY after AGE_MS (default 1000;
grpc.max_connection_age_ms);
on SIGTERM a server first runs serve.frontend.listener.drain (stop listening, wait for its
connections to go), then server.stop(5). Run from the repository root with PYTHONPATH=.
"""

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time

import grpc

MODE = os.environ.get("MODE", "plain")
AGE_MS = int(os.environ.get("AGE_MS", "1000"))  # MODE=drain: the connections' age


async def serve(port):
    age = [("grpc.max_connection_age_ms", AGE_MS)] if MODE == "drain" else []
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), *age])

    async def handler(req, ctx):
        await asyncio.sleep(float(os.environ.get("SLEEP", "0")))
        return req

    h = grpc.method_handlers_generic_handler(
        "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}
    )
    server.add_generic_rpc_handlers((h,))
    port = server.add_insecure_port("127.0.0.1:" + port)
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    if MODE == "drain":  # warmserve's relay drain (serve/frontend/listener.py)
        from serve.frontend.listener import drain

        await drain("server", port, AGE_MS * 1.1 / 1000 + 5)
    await server.stop(5)


def start(port):
    p = subprocess.Popen(
        [sys.executable, __file__, "server", str(port)], stdout=subprocess.PIPE, text=True
    )
    return p, int(p.stdout.readline())


async def client(cycles):
    a, port = start(0)
    b, _ = start(port)
    codes = collections.Counter()
    events = []
    done = False

    async def caller(i):
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("x.conn", i)])
        m = ch.unary_unary("/t.T/M")
        while not done:
            try:
                await m(b"x", timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as e:
                codes[e.code().name] += 1
                events.append((time.monotonic(), i, e.code().name, e.details()))
        await ch.close()

    tasks = [asyncio.create_task(caller(i)) for i in range(16)]
    await asyncio.sleep(1)
    loop = asyncio.get_running_loop()
    servers = [a, b]
    for c in range(cycles):
        time.monotonic()
        n0 = len(events)
        victim = servers[c % 2]
        victim.send_signal(signal.SIGTERM)
        await loop.run_in_executor(None, victim.wait)
        servers[c % 2], _ = await loop.run_in_executor(None, start, port)
        await asyncio.sleep(0.7)
        ev = events[n0:]
        if ev:
            by = collections.Counter((e[2]) for e in ev)
            span = ev[-1][0] - ev[0][0]
            print(
                f"cycle {c}: {dict(by)} over {span * 1000:.0f} ms, "
                f"channels {sorted(set(e[1] for e in ev))}, first: {ev[0][3]!r}",
                flush=True,
            )
    done = True
    await asyncio.gather(*tasks)
    [s.kill() for s in servers]
    print("total", dict(codes))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        import uvloop

        uvloop.run(serve(sys.argv[2]))
    else:
        import uvloop

        uvloop.run(client(int(sys.argv[2])))
