"""Soak: does any warmserve process grow (memory, fds, threads) while it serves a mixed load?

    python -m benchmarks.soak --minutes 5 [--frontends 2] [--warm-up-s 60] [--json out.json]

Starts ``warmserve serve`` on 127.0.0.1 with the demo MLP models (ONNX and TorchScript) and
drives, for ``--minutes``, a mix against it from this process (one uvloop, raw request bytes):

- good unary ModelInfer calls, closed loop, c=8, each with a GOOD_DEADLINE_S deadline (a call
  stalled that long fails as DEADLINE_EXCEEDED; the slowest good call is printed);
- good ModelStreamInfer calls, closed loop, c=4 (each stream answers STREAM_CALLS calls, then
  is closed and another opened, so stream set-up and tear-down run too); every
  STREAM_BAD_EVERY-th call on a stream is a bad one, which must get an error_message of its own
  while the stream goes on;
- a trickle of bad unary calls (wrong shape, unknown model, wrong datatype);
- calls cancelled by their client mid-flight (a 64-row call cancelled after 0-2 ms);
- calls with a deadline too short to be met (0.2-2 ms);
- model control churn: a third model unloaded and loaded again every RELOAD_INTERVAL_S (the
  server runs with --model-control), so worker templates and workers start and stop while the
  other calls run; each load and unload must answer OK.

Every SAMPLE_S it reads RSS (and anonymous RSS), open fds and threads of every process in the
server's tree (the serving process, worker templates, workers, relays) from /proc, with the
number of calls answered so far. At the end it prints, per process, a least-squares line of each
figure against calls over the samples after the warm-up (``--warm-up-s``): growth per 100k
calls, the change over the fitted window and how well the line fits; then the calls by kind
and gRPC status. Good calls (unary and streamed, neither cancelled nor with a short deadline)
must all be OK: any other status is printed as a failure and makes the exit status 1.
Nothing is asserted about timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import uvloop

from benchmarks.compare import exit_on_sigterm
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import build_mlp_onnx, build_mlp_torch
from tests.integration.harness import ServerProcess, live_children, wait_until

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
LOAD_METHOD = "/inference.GRPCInferenceService/RepositoryModelLoad"
UNLOAD_METHOD = "/inference.GRPCInferenceService/RepositoryModelUnload"
RELOAD_MODEL = "mlp_reload"  # the model the reload part unloads and loads again
RELOAD_INTERVAL_S = 1.0
RELOAD_TIMEOUT_S = 120.0
GOOD_DEADLINE_S = 10.0  # far above any good call's latency: only a stalled call reaches it
MODELS = ("mlp_onnx", "mlp_torch")
WIDTH = 64
SAMPLE_S = 5.0
UNARY_CONCURRENCY = 8
STREAM_CONCURRENCY = 4
STREAM_CALLS = 500  # calls per stream before it is closed and another opened
STREAM_BAD_EVERY = 50
BAD_INTERVAL_S = 0.05
CANCEL_INTERVAL_S = 0.02
SHORT_DEADLINE_INTERVAL_S = 0.02
START_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 30.0
GOOD_KINDS = ("unary", "stream")
PARTS = ("unary", "stream", "bad", "cancel", "deadline", "reload")  # the load's parts (--parts)
FIGURES = ("rss_kb", "anon_kb", "fds", "threads")


# --- pure parts: samples, fit, summary ----------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the load started
    calls: int  # calls answered (any status) so far
    figures: dict[str, float]  # rss_kb, anon_kb, fds, threads


@dataclass
class Series:
    pid: int
    role: str
    samples: list[Sample] = field(default_factory=list)


@dataclass(frozen=True)
class Fit:
    per_100k: float  # the line's slope, per 100k calls
    change: float  # the line's rise over the fitted window
    first: float  # the first and last fitted samples' values
    last: float
    r2: float  # how much of the variance the line explains (0 for a flat series)
    points: int


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept``: (slope, intercept, r²). Fewer than two
    distinct x: slope 0. A series without variance has r² 0 (nothing to explain)."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(x) < 2 or float(np.ptp(x)) == 0.0:
        return 0.0, float(y.mean()) if len(y) else 0.0, 0.0
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (slope * x + intercept)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else 0.0
    return float(slope), float(intercept), r2


def growth(samples: list[Sample], figure: str, warm_up_s: float) -> Fit | None:
    """The fit of ``figure`` against calls over the samples taken after ``warm_up_s``; None when
    fewer than three are left."""
    kept = [s for s in samples if s.t >= warm_up_s and figure in s.figures]
    if len(kept) < 3:
        return None
    xs = [float(s.calls) for s in kept]
    ys = [s.figures[figure] for s in kept]
    slope, _, r2 = linear_fit(xs, ys)
    return Fit(
        per_100k=slope * 1e5,
        change=slope * (xs[-1] - xs[0]),
        first=ys[0],
        last=ys[-1],
        r2=r2,
        points=len(kept),
    )


def steady_growth(fit: Fit, figure: str) -> bool:
    """A rise that the line explains well and that is beyond allocator noise: RSS 2 MiB or more
    over the window, or any fd / thread more, with r² of at least 0.8."""
    floor = 2048.0 if figure.endswith("_kb") else 0.5
    return fit.change >= floor and fit.r2 >= 0.8


def growth_table(series: list[Series], warm_up_s: float) -> list[dict[str, object]]:
    """One row per process and figure: the fit after the warm-up, and whether it grows."""
    rows: list[dict[str, object]] = []
    for one in series:
        for figure in FIGURES:
            fit = growth(one.samples, figure, warm_up_s)
            if fit is None:
                continue
            rows.append(
                {
                    "pid": one.pid,
                    "role": one.role,
                    "figure": figure,
                    "per_100k": fit.per_100k,
                    "change": fit.change,
                    "first": fit.first,
                    "last": fit.last,
                    "r2": fit.r2,
                    "points": fit.points,
                    "grows": steady_growth(fit, figure),
                }
            )
    return rows


def short_deadline_status(code: str, details: str) -> tuple[str, bool]:
    """A short-deadline call's status as counted, and whether it is one the soak expects: OK,
    DEADLINE_EXCEEDED, or UNAVAILABLE from a connection-age GOAWAY, which gRPC gives a call of a
    few milliseconds instead of DEADLINE_EXCEEDED now and then (the relays' connections age:
    benchmarks/RESULTS.md, sixteenth session), counted apart as UNAVAILABLE_AT_GOAWAY."""
    if code == "UNAVAILABLE" and "GOAWAY received" in details and "max_age" in details:
        return "UNAVAILABLE_AT_GOAWAY", True
    return code, code in ("OK", "DEADLINE_EXCEEDED")


def failed_good_calls(statuses: Counter[tuple[str, str]]) -> dict[str, int]:
    """The good calls (plain unary, plain streamed) that did not end OK, by kind/status."""
    return {
        f"{kind}/{status}": count
        for (kind, status), count in sorted(statuses.items())
        if kind in GOOD_KINDS and status != "OK"
    }


def format_report(rows: list[dict[str, object]], statuses: Counter[tuple[str, str]]) -> str:
    lines = ["process            figure       first       last   per 100k calls   r²   grows"]
    for row in rows:
        lines.append(
            f"{row['role']:>10s} {row['pid']:<7d} {row['figure']:8s} {row['first']:>10.0f}"
            f" {row['last']:>10.0f} {row['per_100k']:>+16.1f} {row['r2']:5.2f}"
            f"  {'YES' if row['grows'] else 'no'}"
        )
    lines.append("calls by kind and status:")
    for (kind, status), count in sorted(statuses.items()):
        lines.append(f"  {kind:16s} {status:20s} {count}")
    failed = failed_good_calls(statuses)
    lines.append(f"good calls not OK: {failed or 'none'}")
    return "\n".join(lines)


# --- /proc ----------------------------------------------------------------------------------------


def _role(pid: int, parent_role: str) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    if parent_role == "template":  # forked: the template's command line
        return "worker"
    if b"serve.worker.template" in cmdline:
        return "template"
    if b"serve.worker" in cmdline:
        return "worker"
    if b"resource_tracker" in cmdline:
        return "res-track"
    if b"multiprocessing" in cmdline:
        return "relay"
    return "helper"


def tree_roles(root: int) -> dict[int, str]:
    """pid → role of ``root`` ("serving") and every live descendant."""
    children = live_children()
    roles, todo = {root: "serving"}, [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            roles[child] = _role(child, roles[pid])
            todo.append(child)
    return roles


def read_figures(pid: int) -> dict[str, float] | None:
    """RSS and anonymous RSS (kB), open fds and threads of ``pid``; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        values[key] = rest.split()[0] if rest.split() else "0"
    return {
        "rss_kb": float(values.get("VmRSS", 0)),
        "anon_kb": float(values.get("RssAnon", 0)),
        "fds": float(fds),
        "threads": float(values.get("Threads", 0)),
    }


# --- load -----------------------------------------------------------------------------------------


def _request(model: str, rows: int = 1, datatype: str = "FP32", width: int = WIDTH) -> bytes:
    x = np.random.default_rng(rows).standard_normal((rows, width)).astype(np.float32)
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="INPUT0", datatype=datatype, shape=[rows, width])
    message.raw_input_contents.append(x.tobytes())
    return bytes(message.SerializeToString())


GOOD = {model: _request(model) for model in MODELS}
BIG = {model: _request(model, rows=64) for model in MODELS}
BAD = {  # kind → (payload, the status it must get)
    "bad_shape": (_request(MODELS[0], width=WIDTH + 1), "INVALID_ARGUMENT"),
    "bad_model": (_request("no_such_model"), "NOT_FOUND"),
    "bad_dtype": (_request(MODELS[0], datatype="FP64"), "INVALID_ARGUMENT"),
}


class Soak:
    def __init__(
        self, url: str, root_pid: int, seconds: float, parts: tuple[str, ...] = PARTS
    ) -> None:
        self.url = url
        self.parts = parts
        self.root_pid = root_pid
        self.seconds = seconds
        self.statuses: Counter[tuple[str, str]] = Counter()
        self.calls = 0
        self.series: dict[int, Series] = {}
        self.wrong: Counter[str] = Counter()  # bad calls answered with a status not expected
        # every unexpected failure: (kind, status, gRPC's details), so a rare one can be traced
        self.details: Counter[tuple[str, str, str]] = Counter()
        self.slowest_s = 0.0  # the slowest good unary call that ended OK
        self._end = 0.0
        self._started = 0.0

    def count(self, kind: str, status: str) -> None:
        self.statuses[(kind, status)] += 1
        self.calls += 1

    def unexpected(self, kind: str, exc: grpc.aio.AioRpcError) -> None:
        self.details[(kind, exc.code().name, str(exc.details()))] += 1

    def running(self) -> bool:
        return time.monotonic() < self._end

    async def unary(self, channel: grpc.aio.Channel, index: int) -> None:
        call = channel.unary_unary(METHOD)
        n = index
        while self.running():
            n += 1
            start = time.monotonic()
            try:
                await call(GOOD[MODELS[n % 2]], timeout=GOOD_DEADLINE_S)
                self.count("unary", "OK")
                self.slowest_s = max(self.slowest_s, time.monotonic() - start)
            except grpc.aio.AioRpcError as exc:
                self.count("unary", exc.code().name)
                self.unexpected("unary", exc)

    async def streamer(self, channel: grpc.aio.Channel, index: int) -> None:
        method = channel.stream_stream(STREAM_METHOD)
        n = index
        while self.running():
            stream = method()
            try:
                for _ in range(STREAM_CALLS):
                    if not self.running():
                        break
                    n += 1
                    bad = n % STREAM_BAD_EVERY == 0
                    await stream.write(BAD["bad_shape"][0] if bad else GOOD[MODELS[n % 2]])
                    answer = await stream.read()
                    if answer is grpc.aio.EOF:
                        self.count("stream", "EOF")
                        break
                    failed = bytes(answer)[:1] == b"\x0a"  # error_message, field 1
                    kind = "stream_bad" if bad else "stream"
                    self.count(kind, "ERROR_MESSAGE" if failed else "OK")
                    if bad != failed:
                        self.wrong[kind] += 1
                await stream.done_writing()
                while (await asyncio.wait_for(stream.read(), 30)) is not grpc.aio.EOF:
                    self.count("stream", "EXTRA_ANSWER")  # nothing more should come
            except grpc.aio.AioRpcError as exc:
                self.count("stream", exc.code().name)
                self.unexpected("stream", exc)
            finally:
                stream.cancel()

    async def bad(self, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(METHOD)
        kinds = list(BAD)
        n = 0
        while self.running():
            kind = kinds[n % len(kinds)]
            n += 1
            payload, expected = BAD[kind]
            try:
                await call(payload, timeout=30)
                status = "OK"
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
                if status != expected:
                    self.unexpected(kind, exc)
            self.count(kind, status)
            if status != expected:
                self.wrong[kind] += 1
            await asyncio.sleep(BAD_INTERVAL_S)

    async def cancelled(self, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(METHOD)
        n = 0
        while self.running():
            n += 1
            pending = call(BIG[MODELS[n % 2]])
            await asyncio.sleep(random.uniform(0, 0.002))
            pending.cancel()
            try:
                await pending
                status = "OK"
            except asyncio.CancelledError:
                status = "CANCELLED"
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
            self.count("cancelled", status)
            await asyncio.sleep(CANCEL_INTERVAL_S)

    async def short_deadline(self, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(METHOD)
        n = 0
        while self.running():
            n += 1
            try:
                await call(BIG[MODELS[n % 2]], timeout=random.uniform(0.0002, 0.002))
                status, expected = "OK", True
            except grpc.aio.AioRpcError as exc:
                status, expected = short_deadline_status(exc.code().name, str(exc.details()))
                if not expected:
                    self.unexpected("short_deadline", exc)
            self.count("short_deadline", status)
            if not expected:
                self.wrong["short_deadline"] += 1
            await asyncio.sleep(SHORT_DEADLINE_INTERVAL_S)

    async def reload(self, channel: grpc.aio.Channel) -> None:
        """Unload RELOAD_MODEL and load it again, over and over: each load starts a worker
        template and workers in the serving process while the other parts' calls are in flight."""
        requests = (
            ("unload", UNLOAD_METHOD, pb.RepositoryModelUnloadRequest(model_name=RELOAD_MODEL)),
            ("load", LOAD_METHOD, pb.RepositoryModelLoadRequest(model_name=RELOAD_MODEL)),
        )
        while self.running():
            for kind, method, message in requests:
                try:
                    await channel.unary_unary(method)(
                        message.SerializeToString(), timeout=RELOAD_TIMEOUT_S
                    )
                    status = "OK"
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                    self.unexpected(kind, exc)
                self.count(kind, status)
                if status != "OK":
                    self.wrong[kind] += 1
            await asyncio.sleep(RELOAD_INTERVAL_S)

    def sample(self) -> None:
        t = time.monotonic() - self._started
        for pid, role in tree_roles(self.root_pid).items():
            figures = read_figures(pid)
            if figures is None:
                continue
            series = self.series.setdefault(pid, Series(pid, role))
            series.samples.append(Sample(t, self.calls, figures))

    async def sampler(self) -> None:
        while self.running():
            self.sample()
            elapsed = time.monotonic() - self._started
            print(f"  {elapsed:6.0f} s  {self.calls} calls", flush=True)
            await asyncio.sleep(SAMPLE_S)
        self.sample()

    async def run(self) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(self.url, options=options) for _ in range(4)]
        try:
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), 30)
            self._started = time.monotonic()
            self._end = self._started + self.seconds
            jobs = [self.sampler()]
            if "unary" in self.parts:
                jobs += [self.unary(channels[i % 2], i) for i in range(UNARY_CONCURRENCY)]
            if "stream" in self.parts:
                jobs += [self.streamer(channels[2], i) for i in range(STREAM_CONCURRENCY)]
            if "bad" in self.parts:
                jobs.append(self.bad(channels[3]))
            if "cancel" in self.parts:
                jobs.append(self.cancelled(channels[3]))
            if "deadline" in self.parts:
                jobs.append(self.short_deadline(channels[3]))
            if "reload" in self.parts:
                jobs.append(self.reload(channels[3]))
            tasks = [asyncio.ensure_future(job) for job in jobs]
            done, pending = await asyncio.wait(tasks, timeout=self.seconds + DRAIN_TIMEOUT_S)
            for task in pending:  # a call that did not end within the drain: counted, cancelled
                print(f"soak: a load task still running {DRAIN_TIMEOUT_S} s after the end")
                self.count("unfinished", "STUCK")
                task.cancel()
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for channel in channels:
                await channel.close()


def build_repository(folder: Path, reload: bool = False) -> None:
    build_mlp_onnx(folder / "mlp_onnx")
    build_mlp_torch(folder / "mlp_torch")
    if reload:
        build_mlp_onnx(folder / RELOAD_MODEL, name=RELOAD_MODEL)


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--frontends", type=int, default=1, help="relay processes (1: none)")
    parser.add_argument("--warm-up-s", type=float, default=60.0, help="left out of the fits")
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts"
    )
    parser.add_argument("--json", type=Path, help="write samples, fits and statuses here")
    parser.add_argument("--log", type=Path, help="write the server's log here")
    args = parser.parse_args()
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    seconds = args.minutes * 60
    warm_up = min(args.warm_up_s, seconds / 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reload = "reload" in args.parts
        build_repository(root / "repo", reload)
        options: tuple[str, ...] = (
            ("--frontends", str(args.frontends)) if args.frontends > 1 else ()
        )
        options += ("--model-control",) if reload else ()
        server = ServerProcess(root / "server.log", root / "repo", options)
        try:
            wait_until(server.ready_over_http, START_TIMEOUT_S, "the server ready")
            print(f"soak: {args.minutes} min against pid {server.process.pid} ({server.url})")
            soak = Soak(server.url, server.process.pid, seconds, tuple(args.parts))
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(soak.run())
            alive = server.process.poll() is None
        finally:
            code = server.stop()
            log = server.log()
    series = list(soak.series.values())
    rows = growth_table(series, warm_up)
    print(f"soak: {soak.calls} calls in {args.minutes} min; fits after {warm_up:.0f} s")
    print(format_report(rows, soak.statuses))
    print(f"bad calls, loads and unloads with an unexpected status: {dict(soak.wrong) or 'none'}")
    for (kind, status, details), n in soak.details.most_common(10):
        print(f"  unexpected: {kind} {status} x{n}: {details}")
    print(f"slowest good unary call: {soak.slowest_s * 1000:.1f} ms")
    print(f"server alive at the end: {alive}; exit status {code}")
    lines = log.splitlines()
    recycled = sum("recycling it" in line for line in lines)
    restarted = sum("exited with code" in line for line in lines)
    print(f"relays recycled for their memory: {recycled}; relays that exited: {restarted}")
    errors = [line for line in lines if " ERROR " in line or "Traceback" in line]
    print(f"server log: {len(errors)} ERROR/Traceback lines")
    for line in errors[:20]:
        print("  " + line)
    warnings = [line for line in lines if " WARNING " in line]
    print(f"server log: {len(warnings)} WARNING lines (the first 20 follow)")
    for line in warnings[:20]:
        print("  " + line[:300])
    if args.log:
        args.log.write_text(log)
    if args.json:
        data = {
            "minutes": args.minutes,
            "frontends": args.frontends,
            "calls": soak.calls,
            "slowest_good_unary_ms": soak.slowest_s * 1000,
            "warm_up_s": warm_up,
            "rows": rows,
            "statuses": {f"{k}/{s}": n for (k, s), n in soak.statuses.items()},
            "samples": {
                f"{s.role}-{s.pid}": [[x.t, x.calls, x.figures] for x in s.samples] for s in series
            },
        }
        args.json.write_text(json.dumps(data, indent=1))
    bad_run = failed_good_calls(soak.statuses) or soak.wrong or not alive
    sys.exit(1 if bad_run else 0)


if __name__ == "__main__":
    main()
