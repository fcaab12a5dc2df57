"""warmserve against the bare in-process floor server, same model, same client, same machine.

    python -m benchmarks.compare            # full: closed + open loop, perf_analyzer, plots
    python -m benchmarks.compare --quick    # under a minute: the two headline ratios
    python -m benchmarks.compare --peers mlserver pytriton rayserve   # and these peer servers

Peers (Seldon MLServer, NVIDIA PyTriton, Ray Serve) run from their own venvs under
benchmarks/.peers/ (made by `bash benchmarks/peers/setup.sh` from
benchmarks/peers/<peer>/requirements.txt), serving the same model.onnx over the same Open
Inference Protocol gRPC call, one setting at a time (see PEER_SETTINGS); every figure of theirs
is printed as a ratio to warmserve's. By default every peer whose venv exists runs; --quick runs
none unless --peers names them.

Besides the floor, the "hop floor" (floor_server.py --hop: the same handler, with the model in a
second process reached over a socketpair, nothing else) shows what the process hop alone costs.

The floor, the hop floor and warmserve run side by side and take turns under the closed loop,
round after round (--rounds, default 3; rounds.py), all three started afresh for each round
(SideBySide: a server's figures depend on where its life's processes were placed): every
closed-loop figure is the median over the rounds, and the c=1 ratios are also printed round by
round. Peers run one at a time afterwards, with the same rounds on one life each. The open
loop (Poisson arrivals) follows, at rates scaled to this machine: 25, 50 and 80 % of the floor's
closed-loop throughput at the highest concurrency in the same run (OPEN_LOOP_SHARES), the same
rates for every server; --rates fixes them. The model is the demo MLP (ONNX, 64→256→256→10).
For each load level it records P50/P95/P99/max, throughput, errors and the server's CPU time
per call (its whole process tree: warmserve's workers included, and processes that ended
meanwhile; read where the measured calls start and end). Results go to benchmarks/out/ as JSON,
with a latency-vs-throughput plot and latency CDFs; warmserve's own overhead breakdown (from its
timestamps, over the last round's server: its closed loop, open loop and perf_analyzer) is
printed beside the totals.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks import loadgen, pa_report, provenance, rounds
from benchmarks.proctree import tree_cpu_seconds
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.pb import grpc_service_pb2_grpc as pb_grpc
from serve.testing.models import build_mlp_onnx, mlp_reference
from tests.integration.harness import ServerProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
PERF_ANALYZER = ROOT / "benchmarks" / ".tools" / "perf_analyzer"
STREAMED = "-stream"  # a server's row measured with streaming clients (ModelStreamInfer)
PEERS_SRC = ROOT / "benchmarks" / "peers"
PEERS_ENV = ROOT / "benchmarks" / ".peers"
MODEL = "mlp_onnx"
PEER_START_TIMEOUT_S = 120.0
PEER_STOP_TIMEOUT_S = 30.0
FLOOR_START_TIMEOUT_S = 60.0
FLOOR_STOP_TIMEOUT_S = 30.0
PERF_ANALYZER_TIMEOUT_S = 180.0
PERF_ANALYZER_CONCURRENCY = (1, 16)
PERF_ANALYZER_INTERVAL_MS = 2000
PERF_ANALYZER_STABILITY = pa_report.LOOSE_STABILITY
WARM_UP_CONCURRENCY = 4
WARM_UP_SECONDS = 1.0
# Open loop, unless --rates gives the rates: these shares of the floor's closed-loop throughput
# at the highest concurrency of the same run, so that queueing shows on any machine (fixed rates
# that load a 2-vCPU VM to 80 % would leave a large host idle). Every server gets the same rates.
OPEN_LOOP_SHARES = (0.25, 0.5, 0.8)
FALLBACK_RATES = [250.0, 500.0, 1000.0]  # the floor did not run, or answered nothing


@dataclass(frozen=True)
class PeerSetting:
    peer: str  # folder under benchmarks/peers/ and benchmarks/.peers/
    name: str  # the name in tables, JSON and plots
    args: tuple[str, ...]  # for benchmarks/peers/<peer>/serve.py
    note: str


# One row per way of running a peer. MLServer: its in-process setting (parallel_workers=0) and
# worker processes, each with adaptive batching off and on (up to 16 requests, waiting at most
# 1 ms). PyTriton: Triton's dynamic batcher as warmserve runs it (max_batch_size 64, no queue
# delay), and batching off. Ray Serve: one replica behind Serve's gRPC proxy, without batching and
# with @serve.batch (up to 16 requests, waiting at most 1 ms); max_ongoing_requests 64 in both
# (Serve's default of 5 would cap the batches). All run ONNX Runtime on the CPU with one intra-op
# thread.
PEER_SETTINGS: dict[str, list[PeerSetting]] = {
    "mlserver": [
        PeerSetting("mlserver", "mlserver-w0", ("--workers", "0"), "in-process, no batching"),
        PeerSetting(
            "mlserver",
            "mlserver-w0-batch",
            ("--workers", "0", "--batch", "16", "--batch-wait-ms", "1"),
            "in-process, adaptive batching (16, 1 ms)",
        ),
        PeerSetting("mlserver", "mlserver-w1", ("--workers", "1"), "1 worker, no batching"),
        PeerSetting(
            "mlserver",
            "mlserver-w1-batch",
            ("--workers", "1", "--batch", "16", "--batch-wait-ms", "1"),
            "1 worker, adaptive batching (16, 1 ms)",
        ),
        PeerSetting("mlserver", "mlserver-w2", ("--workers", "2"), "2 workers, no batching"),
        PeerSetting(
            "mlserver",
            "mlserver-w2-batch",
            ("--workers", "2", "--batch", "16", "--batch-wait-ms", "1"),
            "2 workers, adaptive batching (16, 1 ms)",
        ),
    ],
    "pytriton": [
        PeerSetting(
            "pytriton",
            "pytriton-batch",
            ("--max-batch", "64", "--batch-delay-us", "0"),
            "dynamic batching (64, no delay)",
        ),
        PeerSetting("pytriton", "pytriton-nobatch", ("--no-batching",), "batching off"),
    ],
    "rayserve": [
        PeerSetting("rayserve", "rayserve-nobatch", ("--batch", "0"), "1 replica, no batching"),
        PeerSetting(
            "rayserve",
            "rayserve-batch",
            ("--batch", "16", "--batch-wait-ms", "1"),
            "1 replica, @serve.batch (16, 1 ms)",
        ),
    ],
}
PEER_PACKAGES = {"mlserver": "mlserver", "pytriton": "nvidia-pytriton", "rayserve": "ray"}


class FloorProcess:
    def __init__(self, model_dir: Path, log: Path, *, hop: bool = False, echo: int = 0) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self._log = log.open("wb")
        command = [sys.executable, "-m", "benchmarks.floor_server", "--model-dir", str(model_dir)]
        command += ["--port", str(self.port), *(["--hop"] if hop else [])]
        command += ["--echo", str(echo)] if echo else []
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self._listening(log), FLOOR_START_TIMEOUT_S, "the floor server")
        except BaseException:  # (Ctrl-C too) a floor that never listened is not left running
            self.stop()
            raise

    def _listening(self, log: Path) -> bool:
        if b"listening" in log.read_bytes():
            return True
        if self.process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"the floor server exited with {self.process.returncode}:\n{tail}")
        return False

    def stop(self, timeout: float = FLOOR_STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
        finally:
            self._log.close()


class SideBySide:
    """The floor, the hop floor and warmserve, up side by side; ``restart()`` stops them and
    starts them afresh. Each round of the closed loop gets servers of its own: where the kernel
    places a server's processes and threads (which core its event loop, gRPC's poller and the
    worker share, or not) holds for the server's life and moves its c=1 figures by up to ~15 %
    from one life to the next. Rounds on one life measure that life's placement three times;
    rounds on fresh lives sample it."""

    def __init__(self, folder: Path, logs: Path) -> None:
        self._folder = folder
        self._logs = logs
        self._lives = 0
        self._running: list[FloorProcess | ServerProcess] = []
        self.warmserve: ServerProcess | None = None
        self.servers: dict[str, tuple[str, int]] = {}

    def start(self) -> None:
        life = self._lives
        self._lives += 1
        try:
            floor = FloorProcess(self._folder, self._logs / f"floor-{life}.log")
            self._running.append(floor)
            hop = FloorProcess(self._folder, self._logs / f"floor-hop-{life}.log", hop=True)
            self._running.append(hop)
            server = ServerProcess(self._logs / f"warmserve-{life}.log", self._folder.parent)
            self._running.append(server)
            server.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.warmserve = server
        self.servers = {
            "floor": (floor.url, floor.process.pid),
            "floor-hop": (hop.url, hop.process.pid),
            "floor" + STREAMED: (floor.url, floor.process.pid),
            "warmserve": (server.url, server.process.pid),
            "warmserve" + STREAMED: (server.url, server.process.pid),
        }

    def restart(self) -> dict[str, tuple[str, int]]:
        self.stop()
        self.start()
        return self.servers

    def stop(self) -> None:
        running, self._running = self._running, []
        for process in reversed(running):
            process.stop()


def _peer_python(peer: str) -> Path:
    return PEERS_ENV / peer / "bin" / "python"


def _peer_version(peer: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({PEER_PACKAGES[peer]!r}))"
    run = subprocess.run(
        [str(_peer_python(peer)), "-c", code], capture_output=True, text=True, timeout=60
    )
    return run.stdout.strip() or "?"


class PeerProcess:
    """A peer server in its own venv and its own session (process group), on 127.0.0.1."""

    def __init__(self, setting: PeerSetting, onnx: Path, log: Path) -> None:
        self.setting = setting
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        command = [str(_peer_python(setting.peer)), str(PEERS_SRC / setting.peer / "serve.py")]
        command += ["--onnx", str(onnx), "--grpc-port", str(self.port), *setting.args]
        scratch = log.with_suffix("")  # its temporary files, removed with the caller's folder
        scratch.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=scratch,
            env={**os.environ, "TMPDIR": str(scratch)},
            start_new_session=True,
        )

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = PEER_START_TIMEOUT_S) -> None:
        """ServerReady and ModelReady over gRPC, then one checked inference."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.setting.name} exited with {self.process.returncode}:\n"
                        + self.log_tail()
                    )
                try:
                    ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready
                    model = pb.ModelReadyRequest(name=MODEL)
                    if ready and stub.ModelReady(model, timeout=2).ready:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.setting.name} not ready after {timeout:.0f} s:\n" + self.log_tail()
                    )
                time.sleep(0.2)
        _check_inference(self.url)

    def stop(self) -> None:
        """SIGTERM to the server, then SIGKILL to whatever is left of its process group."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(PEER_STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # its session: workers, tritonserver
            self.process.wait(10)
        finally:
            self._log.close()


def _check_inference(url: str) -> None:
    """One ModelInfer with the load generator's request; the answer must be the demo MLP's."""
    payload = loadgen.request_bytes(MODEL)
    request = pb.ModelInferRequest.FromString(payload)
    x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(1, -1)
    with grpc.insecure_channel(url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    if response.raw_output_contents:
        y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    elif response.outputs:
        y = np.asarray(response.outputs[0].contents.fp32_contents, dtype=np.float32)
    else:  # (a RuntimeError: the peer's setting fails, the others and the results go on)
        raise RuntimeError(f"{url} answered no output at all")
    expected = mlp_reference(x)
    if y.size != expected.size or not np.allclose(y.reshape(expected.shape), expected, atol=1e-4):
        raise RuntimeError(f"{url} answered {y.tolist()}, not the demo MLP's {expected.tolist()}")


def _select_peers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[PeerSetting]:
    """--peers names peers (all their settings) or single settings; default: installed peers."""
    if args.peers is None:
        names = [] if args.quick else [p for p in PEER_SETTINGS if _peer_python(p).exists()]
    else:
        names = args.peers
    by_name = {s.name: s for settings in PEER_SETTINGS.values() for s in settings}
    chosen: list[PeerSetting] = []
    for name in names:
        if name in PEER_SETTINGS:
            chosen += PEER_SETTINGS[name]
        elif name in by_name:
            chosen.append(by_name[name])
        else:
            known = ", ".join(dict.fromkeys([*PEER_SETTINGS, *by_name]))
            parser.error(f"unknown peer {name!r}: one of {known}")
    for peer in sorted({s.peer for s in chosen}):
        if not _peer_python(peer).exists():
            parser.error(f"{peer} is not installed: run  bash benchmarks/peers/setup.sh {peer}")
    return list(dict.fromkeys(chosen))


def _machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    return {
        "cpu": cpu or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": provenance.git_state(),
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """How the run was made, for its JSON record."""
    return {
        "quick": args.quick,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "open_loop_rates": args.rates,
        "open_loop_rates_from": getattr(args, "rates_from", "given (--rates)"),
        "peers": args.peers,
        "warm_up": {"concurrency": WARM_UP_CONCURRENCY, "seconds": WARM_UP_SECONDS},
        "model": MODEL,
        "percentiles": f"numpy {loadgen.PERCENTILE_METHOD}, over the answered calls",
        "perf_analyzer": {
            "concurrency": list(PERF_ANALYZER_CONCURRENCY),
            "measurement_interval_ms": PERF_ANALYZER_INTERVAL_MS,
            "stability_percentage": PERF_ANALYZER_STABILITY,
        },
    }


def _measure(
    url: str,
    pid: int,
    *,
    concurrency: int = 0,
    rate: float = 0,
    seconds: float,
    streaming: bool = False,
) -> dict[str, Any]:
    marks: list[float] = []  # the tree's CPU time where the measured calls start and end
    result = loadgen.run(
        url,
        MODEL,
        concurrency=concurrency,
        rate=rate,
        seconds=seconds,
        streaming=streaming,
        window=lambda: marks.append(tree_cpu_seconds(pid)),
    )
    cpu = marks[1] - marks[0]
    row: dict[str, Any] = result.summary()
    row["server_cpu_us_per_call"] = cpu / result.count * 1e6 if result.count else float("nan")
    row["latencies_ms"] = result.latencies_ms
    return row


def _perf_analyzer(url: str, concurrency: int, streaming: bool = False) -> dict[str, Any] | None:
    """perf_analyzer's throughput and percentiles at ``concurrency``; None where it is not
    installed, {"error": why} where it failed, timed out or wrote no usable report."""
    if not PERF_ANALYZER.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pa.csv"
        command = [str(PERF_ANALYZER), "-m", MODEL, "-i", "grpc", "-u", url, "-f", str(report)]
        command += ["--streaming"] if streaming else []
        command += ["--concurrency-range", f"{concurrency}:{concurrency}"]
        command += ["--measurement-interval", str(PERF_ANALYZER_INTERVAL_MS)]
        command += ["--stability-percentage", str(PERF_ANALYZER_STABILITY)]
        return _perf_analyzer_result(command, report, concurrency, PERF_ANALYZER_TIMEOUT_S)


def _perf_analyzer_result(
    command: list[str], report: Path, concurrency: int, timeout: float
) -> dict[str, Any]:
    """Run perf_analyzer's ``command`` and read the ``report`` it writes; {"error": why} where
    it fails, times out or writes no usable report (a failed cross-check is kept, not dropped)."""
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"perf_analyzer timed out after {timeout:g} s"}
    output = "\n".join((run.stdout + run.stderr).strip().splitlines()[-10:])
    if run.returncode != 0 or not report.exists():
        return {"error": f"perf_analyzer exited with {run.returncode}: {output}"}
    try:
        return dict(pa_report.parse_csv(report.read_text(), concurrency))
    except ValueError as error:
        return {"error": str(error)}


def run_servers(
    servers: dict[str, tuple[str, int]],
    args: argparse.Namespace,
    restart: Callable[[], dict[str, tuple[str, int]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Closed loop in alternated rounds over ``servers`` (name → url, pid), then each one's open
    loop and perf_analyzer cross-check. A name ending in STREAMED is the same server driven by
    streaming clients (ModelStreamInfer; closed loop only). With ``restart``, every round after
    the first runs on the servers it returns, started afresh (SideBySide); the open loop and
    perf_analyzer run on the last round's."""
    servers = dict(servers)

    def warm_up() -> None:
        for name, (url, _) in servers.items():  # warm both ends before measuring
            streaming = name.endswith(STREAMED)
            loadgen.run(
                url,
                MODEL,
                concurrency=WARM_UP_CONCURRENCY,
                seconds=WARM_UP_SECONDS,
                streaming=streaming,
            )

    def before_round(index: int) -> None:
        if index and restart is not None:
            servers.update(restart())
        if index == 0 or restart is not None:
            warm_up()

    def closed_loop(name: str, concurrency: int) -> dict[str, Any]:
        url, pid = servers[name]
        streaming = name.endswith(STREAMED)
        return _measure(
            url, pid, concurrency=concurrency, seconds=args.seconds, streaming=streaming
        )

    closed = rounds.alternate(
        list(servers), args.concurrency, args.rounds, closed_loop, before_round
    )
    if args.rates is None:  # the first servers measured, the floor among them, set the rates
        args.rates, args.rates_from = open_loop_rates(closed.get("floor", []))
        print(f"open loop at {', '.join(f'{r:g}' for r in args.rates)} calls/s: {args.rates_from}")
    out: dict[str, dict[str, Any]] = {}
    for name, (url, pid) in servers.items():
        streaming = name.endswith(STREAMED)
        rates = [] if streaming else args.rates
        opened = [_measure(url, pid, rate=r, seconds=args.seconds) for r in rates]
        cross = {}
        if not args.quick:
            cross = {c: _perf_analyzer(url, c, streaming) for c in PERF_ANALYZER_CONCURRENCY}
        for row in closed[name] + opened:
            print(
                f"  {name:17s} {row['mode']:6s} {row['level']:>6}: {row['throughput']:7.0f}/s "
                f"p50 {row['p50_ms']:.3f} p95 {row['p95_ms']:.3f} p99 {row['p99_ms']:.3f} "
                f"max {row['max_ms']:.1f} ms, errors {row['errors']}, "
                f"server CPU {row['server_cpu_us_per_call']:.0f} µs/call{_warnings(row)}"
            )
        out[name] = {"closed": closed[name], "open": opened, "perf_analyzer": cross}
    return out


def open_loop_rates(floor_closed: list[dict[str, Any]]) -> tuple[list[float], str]:
    """The open loop's arrival rates, from the floor's closed-loop rows of this run: shares
    (OPEN_LOOP_SHARES) of its throughput at the highest concurrency, to two significant figures;
    FALLBACK_RATES without such a row. Also how they were chosen, for the report."""
    answered = [row for row in floor_closed if row.get("throughput", 0) > 0]
    if not answered:
        return list(FALLBACK_RATES), "fixed (no closed-loop figure of the floor to scale them by)"
    top = max(answered, key=lambda row: row["level"])
    rates = [float(f"{top['throughput'] * share:.2g}") for share in OPEN_LOOP_SHARES]
    shares = "/".join(f"{share:.0%}".rstrip("%") for share in OPEN_LOOP_SHARES)
    how = (
        f"{shares} % of the floor's closed-loop throughput at c={top['level']} in this run "
        f"({top['throughput']:.0f}/s)"
    )
    return rates, how


def _warnings(row: dict[str, Any]) -> str:
    """What makes a row's figures less than clean, for the end of its printed line."""
    out = ""
    if row["errors"]:
        out += f"  [{row['errors']} ERRORS: figures over the {row['count']} answered calls]"
    if row.get("generator_behind"):
        out += f"  [GENERATOR BEHIND: sends {row['send_lag_p99_ms']:.1f} ms late at p99]"
    if row.get("p99_few_samples"):
        out += f"  [p99 of a run of fewer than {loadgen.FEW_FOR_P99} calls]"  # (each round's)
    return out


def _runs_with_errors(results: dict[str, Any]) -> list[str]:
    """'name mode level: N errors' for every row (closed or open) that had failed calls, and
    'name perf_analyzer c=N: reason' for every perf_analyzer run that failed."""
    out = []
    for name, data in results.items():
        for row in data["closed"] + data["open"]:
            if row["errors"]:
                out.append(f"{name} {row['mode']} {row['level']:g}: {row['errors']} errors")
        for c, pa in data.get("perf_analyzer", {}).items():
            if pa is not None and "error" in pa:
                out.append(f"{name} perf_analyzer c={c}: {pa['error'].splitlines()[-1]}")
    return out


def _ratio(top: float, bottom: float) -> float:
    """top / bottom, NaN where bottom is 0 (a run without answers) rather than a crash."""
    return top / bottom if bottom else float("nan")


def batch_rows(metrics: str) -> tuple[float, float]:
    """Rows and batches so far, from a server's Prometheus batch-rows histogram (every model)."""
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("warmserve_batch_rows_sum{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("warmserve_batch_rows_count{"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def _rows_per_batch(metrics: str) -> float:
    """Average batch size over the server's life, from its Prometheus batch-rows histogram."""
    total, count = batch_rows(metrics)
    return total / count if count else 0.0


def _ratios(results: dict[str, Any]) -> dict[str, float]:
    def by_c(rows: list[dict[str, Any]]) -> dict[float, dict[str, Any]]:
        return {r["level"]: r for r in rows}

    ws, floor = results["warmserve"]["closed"], results["floor"]["closed"]
    w, f = by_c(ws), by_c(floor)
    ratios: dict[str, float] = {}
    if 1 in w and 1 in f:
        ratios["c1_p50_vs_floor"] = _ratio(w[1]["p50_ms"], f[1]["p50_ms"])
        ratios["c1_cpu_vs_floor"] = _ratio(
            w[1]["server_cpu_us_per_call"], f[1]["server_cpu_us_per_call"]
        )
    if 16 in w and 16 in f:
        ratios["c16_throughput_vs_floor"] = _ratio(w[16]["throughput"], f[16]["throughput"])
        ratios["c16_p99_vs_floor"] = _ratio(w[16]["p99_ms"], f[16]["p99_ms"])
    if "floor-hop" in results:  # what the process hop alone costs, and warmserve beyond it
        h = by_c(results["floor-hop"]["closed"])
        if 1 in h and 1 in f:
            ratios["c1_cpu_hop_floor_vs_floor"] = _ratio(
                h[1]["server_cpu_us_per_call"], f[1]["server_cpu_us_per_call"]
            )
            ratios["c1_p50_hop_floor_vs_floor"] = _ratio(h[1]["p50_ms"], f[1]["p50_ms"])
        if 1 in h and 1 in w:
            ratios["c1_cpu_vs_hop_floor"] = _ratio(
                w[1]["server_cpu_us_per_call"], h[1]["server_cpu_us_per_call"]
            )
        if 16 in h and 16 in w:
            ratios["c16_throughput_vs_hop_floor"] = _ratio(w[16]["throughput"], h[16]["throughput"])
    streamed = ("warmserve" + STREAMED, "floor" + STREAMED)
    if all(name in results for name in streamed):  # both driven by streaming clients
        st, fs = (by_c(results[name]["closed"]) for name in streamed)
        if 1 in st and 1 in fs:
            ratios["c1_p50_streamed_vs_floor_streamed"] = _ratio(st[1]["p50_ms"], fs[1]["p50_ms"])
            ratios["c1_cpu_streamed_vs_floor_streamed"] = _ratio(
                st[1]["server_cpu_us_per_call"], fs[1]["server_cpu_us_per_call"]
            )
        if 16 in st and 16 in fs:
            ratios["c16_throughput_streamed_vs_floor_streamed"] = _ratio(
                st[16]["throughput"], fs[16]["throughput"]
            )
        if 16 in st and 16 in w:
            ratios["c16_throughput_streamed_vs_unary"] = _ratio(
                st[16]["throughput"], w[16]["throughput"]
            )
    return ratios


def _ratios_by_round(results: dict[str, Any]) -> dict[str, list[float]]:
    """The c=1 ratios to the floor, round by round: the spread behind the medians."""
    w = {r["level"]: r for r in results["warmserve"]["closed"]}
    f = {r["level"]: r for r in results["floor"]["closed"]}
    if 1 not in w or 1 not in f:
        return {}
    return {
        "c1_p50_vs_floor": rounds.paired_ratios(w[1], f[1], "p50_ms"),
        "c1_cpu_vs_floor": rounds.paired_ratios(w[1], f[1], "server_cpu_us_per_call"),
    }


METRICS = (
    ("throughput", "thr", "/s"),
    ("p50_ms", "p50", "ms"),
    ("p95_ms", "p95", "ms"),
    ("p99_ms", "p99", "ms"),
    ("max_ms", "max", "ms"),
    ("server_cpu_us_per_call", "cpu/call", "µs"),
)


def _rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """'c=16' / 'r=500' → measurement row."""
    out = {f"c={r['level']:g}": r for r in data["closed"]}
    out.update({f"r={r['level']:g}": r for r in data["open"]})
    return out


def _top_throughput(data: dict[str, Any]) -> float:
    return max((r["throughput"] for r in data["closed"][-1:]), default=0.0)


def _best_by_peer(results: dict[str, Any], peers: list[PeerSetting]) -> dict[str, str]:
    """Each peer's setting with the highest closed-loop throughput at the top concurrency."""
    best: dict[str, str] = {}
    for peer in dict.fromkeys(s.peer for s in peers):
        ran = [s.name for s in peers if s.peer == peer and s.name in results]
        if ran:
            best[peer] = max(ran, key=lambda name: _top_throughput(results[name]))
    return best


def _peer_ratios(
    results: dict[str, Any], names: list[str], best: dict[str, str]
) -> dict[str, dict[str, dict[str, float]]]:
    """Every figure of every server in ``names`` divided by warmserve's, printed as a table.
    Throughput above 1 and latency or CPU below 1 favour the other server."""
    ws = _rows(results["warmserve"])
    best_names = set(best.values())
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    print("\nratios to warmserve (server / warmserve; thr > 1, latency and CPU < 1 favour the")
    print("server; warmserve's own figures on its line; * = the peer's best setting, c=max thr):")
    header = "".join(f"{label:>9s}" for _, label, _ in METRICS) + "   errors"
    for level, w in ws.items():
        print(f"\n  {w['mode']} {level:7s}     {header}")
        figures = "".join(
            f"{w[key]:>7.0f}{unit:2s}" if unit in ("/s", "µs") else f"{w[key]:>7.3f}{unit:2s}"
            for key, _, unit in METRICS
        )
        print(f"  {'warmserve':20s} {figures} {w['errors']:>8d}")
        for name in names:
            row = _rows(results[name]).get(level)
            if row is None:
                continue
            values = {key: row[key] / w[key] if w[key] else float("nan") for key, _, _ in METRICS}
            ratios.setdefault(name, {})[level] = values
            mark = " *" if name in best_names else ""
            cells = "".join(f"{values[key]:>8.2f}x" for key, _, _ in METRICS)
            print(f"  {name + mark:20s} {cells} {row['errors']:>8d}")
    return ratios


def _without_latencies(data: dict[str, Any]) -> dict[str, Any]:
    """A server's results for the JSON record: the rows without each call's latency (which only
    the CDF plot needs)."""
    out = dict(data)
    for kind in ("closed", "open"):
        out[kind] = [{k: v for k, v in row.items() if k != "latencies_ms"} for row in data[kind]]
    return out


def _ecdf(latencies: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The sorted latencies and, for each, the fraction of calls at or below it (i / n for the
    i-th of n: the fastest call is 1/n of them, not 0)."""
    values = np.sort(np.asarray(latencies, dtype=np.float64))
    return values, np.arange(1, len(values) + 1) / max(1, len(values))


def _plots(results: dict[str, Any], stem: Path, cdf_names: list[str] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10" if len(results) <= 10 else "tab20")
    for i, (name, data) in enumerate(results.items()):
        rows, color = data["closed"], colors(i % colors.N)
        throughput = [r["throughput"] for r in rows]
        ax.plot(throughput, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{name} p50")
        ax.plot(throughput, [r["p99_ms"] for r in rows], "x--", color=color, label=f"{name} p99")
    ax.set(
        yscale="log",  # the slowest peers' tails are 10-20x the fastest servers' p50
        xlabel="throughput (inferences/s)",
        ylabel="latency (ms)",
        title="Latency vs throughput (closed loop)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(stem.with_name(stem.name + "-latency-throughput.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, data in results.items():
        if cdf_names is not None and name not in cdf_names:
            continue
        for row in data["closed"]:
            values, fractions = _ecdf(row["latencies_ms"])
            ax.plot(values, fractions, label=f"{name} c={row['level']}")
    ax.set(
        xscale="log",
        xlabel="latency (ms)",
        ylabel="fraction of calls",
        title="Latency CDF (closed loop)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(stem.with_name(stem.name + "-cdf.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    return paths


def exit_on_sigterm() -> None:
    """SIGTERM (a CI timeout, kill) ends the run as SystemExit, so that every server it started
    is stopped on the way out, as on Ctrl-C, instead of left running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def _save_partial(
    path: Path,
    results: dict[str, Any],
    args: argparse.Namespace,
    peer_info: dict[str, dict[str, Any]],
    failed: dict[str, str],
) -> None:
    """What has been measured so far, written after each server: a run cut short (a peer that
    hangs, a time limit) keeps it. The whole record replaces it at the end."""
    record: dict[str, Any] = {"partial": True, "machine": _machine(), "settings": _settings(args)}
    record["peers"] = {"settings": peer_info, "failed": failed}
    record.update({name: _without_latencies(data) for name, data in results.items()})
    path.write_text(json.dumps(loadgen.json_safe(record), indent=2))


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="c=1 and c=16 only, 1 s a round")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument(
        "--rates",
        type=float,
        nargs="*",
        help="open-loop arrival rates (calls/s); default: 25, 50 and 80 %% of the floor's "
        "closed-loop throughput at the highest concurrency, measured in the same run",
    )
    parser.add_argument("--rounds", type=int, default=3, help="closed-loop rounds (medians)")
    parser.add_argument(
        "--peers",
        nargs="*",
        metavar="PEER",
        help="peers (mlserver, pytriton, rayserve) or single settings (mlserver-w0, ...) to run "
        "too; default: every peer installed by benchmarks/peers/setup.sh (none with --quick)",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.concurrency, args.rates = 1.0, [1, 16], []
    args.concurrency = sorted(args.concurrency)
    peers = _select_peers(parser, args)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    peer_info: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    stem = OUT / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    partial = stem.with_suffix(".partial.json")

    def save_partial() -> None:
        _save_partial(partial, results, args, peer_info, failed)

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_mlp_onnx(Path(tmp) / "repo" / MODEL)
        side_by_side = SideBySide(folder, Path(tmp))
        try:
            side_by_side.start()
            print(
                f"closed loop: medians of {args.rounds} alternated rounds of {args.seconds:g} s, "
                "the floor, the hop floor and warmserve started afresh for each round"
            )
            results.update(run_servers(side_by_side.servers, args, side_by_side.restart))
            server = side_by_side.warmserve
            assert server is not None
            breakdown = server.http_json(f"/warmserve/models/{MODEL}/latency")[1]["breakdown_us"]
            breakdown["rows_per_batch"] = _rows_per_batch(server.http_text("/metrics")[1])
        finally:
            side_by_side.stop()
        if not args.quick:
            save_partial()
        versions = {peer: _peer_version(peer) for peer in dict.fromkeys(s.peer for s in peers)}
        for setting in peers:
            info = {"peer": setting.peer, "version": versions[setting.peer]}
            peer_info[setting.name] = {**info, "args": setting.args, "note": setting.note}
            print(f"\n{setting.name}: {setting.peer} {versions[setting.peer]}, {setting.note}")
            peer = PeerProcess(setting, folder / "model.onnx", Path(tmp) / f"{setting.name}.log")
            try:
                peer.wait_ready()
                served = {setting.name: (peer.url, peer.process.pid)}
                results.update(run_servers(served, args))
            except (RuntimeError, TimeoutError, grpc.RpcError) as error:
                failed[setting.name] = str(error)
                print(f"  {setting.name} FAILED: {error}")
            finally:
                peer.stop()
            save_partial()
    ratios = _ratios(results)
    print(
        "\nwarmserve overhead breakdown (µs; codec and queue per request, the rest per batch; "
        "rows per batch; over the last round's server and its open loop):"
    )
    print(
        "  "
        + ", ".join(f"{k} {v:.{2 if k == 'rows_per_batch' else 0}f}" for k, v in breakdown.items())
    )
    print("\nratios (warmserve / floor): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    by_round = _ratios_by_round(results)
    for key, values in by_round.items():
        print(f"  {key} round by round: " + " ".join(f"{v:.2f}" for v in values))
    ran = [s.name for s in peers if s.name in results]
    best = _best_by_peer(results, peers)
    peer_ratios = _peer_ratios(results, ["floor", "floor-hop", *ran], best) if ran else {}
    for peer_name, name in best.items():
        print(f"best {peer_name} setting: {name} ({peer_info[name]['note']})")
    if failed:
        print("\nFAILED peer settings: " + ", ".join(failed))
    with_errors = _runs_with_errors(results)
    if with_errors:
        print("\nRUNS WITH ERRORS (their figures cover the answered calls only):")
        print("\n".join(f"  {line}" for line in with_errors))
    if args.quick:
        if failed:
            sys.exit(1)
        return
    for name in results:
        for c, pa in results[name]["perf_analyzer"].items():
            if pa and "error" in pa:
                print(f"perf_analyzer {name} c={c} FAILED: {pa['error']}")
            elif pa:
                print(
                    f"perf_analyzer {name} c={c}: {pa['throughput']:.0f}/s "
                    f"p50 {pa['p50_ms']:.3f} ms p99 {pa['p99_ms']:.3f} ms"
                )
    record: dict[str, Any] = {"machine": _machine(), "ratios": ratios, "breakdown_us": breakdown}
    record["ratios_by_round"] = by_round
    record["rounds"] = {"count": args.rounds, "seconds_each": args.seconds}
    record["settings"] = _settings(args)
    record["peers"] = {"settings": peer_info, "best": best, "failed": failed}
    record["ratios_to_warmserve"] = peer_ratios
    record["runs_with_errors"] = with_errors
    for name, data in results.items():
        record[name] = _without_latencies(data)
    # the figures first: a run's measurements outlive a failure to draw them
    stem.with_suffix(".json").write_text(json.dumps(loadgen.json_safe(record), indent=2))
    partial.unlink(missing_ok=True)
    print(f"\nwrote {stem.with_suffix('.json')}")
    cdf_names = ["floor", "warmserve", *best.values()]
    plots = _plots(results, stem, cdf_names)
    print(f"wrote {', '.join(str(p) for p in plots)}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
