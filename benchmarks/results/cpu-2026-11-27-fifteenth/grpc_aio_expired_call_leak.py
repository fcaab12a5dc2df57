"""Evidence (fifteenth session): a bare grpc.aio server's memory per cancelled or expired call.

    python grpc_aio_expired_call_leak.py MODE KIND CALLS

MODE: how the handler behaves (ok, sleep, abort_at_deadline, abort_after_deadline); KIND: what
the client does (ok, deadline: a 2 ms deadline, cancel: cancelled after 1 ms). Prints the
server's anonymous RSS growth per call after a 5,000-call warm-up.
"""

import asyncio
import contextlib
import subprocess
import sys
import time

import grpc


def anon_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


async def serve(mode):

    server = grpc.aio.server()

    async def handler(req, ctx):
        if mode == "sleep":  # core's deadline / client cancel ends it: task cancelled
            await asyncio.sleep(0.01)
            return b"ok"
        if mode == "abort_at_deadline":  # our own timer at the deadline races core's
            rem = ctx.time_remaining()
            await asyncio.sleep(max(0.0, rem) if rem is not None else 0.01)
            await ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "expired")
        if mode == "abort_after_deadline":  # our timer a little after: core wins
            rem = ctx.time_remaining()
            await asyncio.sleep(max(0.0, rem) + 0.005 if rem is not None else 0.01)
            await ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "expired")
        if mode == "ok":
            return b"ok"

    h = grpc.method_handlers_generic_handler(
        "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}
    )
    server.add_generic_rpc_handlers((h,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def drive(port, kind, n):
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = ch.unary_unary("/t.T/M")

    async def one():
        if kind == "deadline":
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call(b"x", timeout=0.002)
        elif kind == "cancel":
            p = call(b"x")
            await asyncio.sleep(0.001)
            p.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await p
        else:
            await call(b"x")

    sem = asyncio.Semaphore(16)

    async def guarded():
        async with sem:
            await one()

    for _ in range(0, n, 1000):
        await asyncio.gather(*(guarded() for _ in range(1000)))
    await ch.close()


def main():
    if sys.argv[1] == "server":
        import uvloop

        uvloop.run(serve(sys.argv[2]))
        return
    mode, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    srv = subprocess.Popen(
        [sys.executable, __file__, "server", mode], stdout=subprocess.PIPE, text=True
    )
    port = int(srv.stdout.readline())
    import uvloop

    uvloop.run(drive(port, kind, 5000))  # warm-up
    a = anon_kb(srv.pid)
    t = time.monotonic()
    uvloop.run(drive(port, kind, n))
    b = anon_kb(srv.pid)
    srv.kill()
    per_call = (b - a) * 1024 / n
    took = time.monotonic() - t
    print(
        f"mode={mode} kind={kind} calls={n} anon_kb {a}->{b}: {per_call:.1f} B/call ({took:.0f} s)"
    )


if __name__ == "__main__":
    main()
