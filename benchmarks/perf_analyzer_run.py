"""Benchmark warmserve with Triton's perf_analyzer.

    bash benchmarks/install_perf_analyzer.sh          # once
    .venv/bin/python -m benchmarks.perf_analyzer_run --model mlp_onnx --concurrency 1 4 16

Without --url it starts ``warmserve serve`` on a free local port and stops it afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient

from benchmarks import pa_report, provenance

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / "benchmarks" / ".tools" / "perf_analyzer"
UNSTABLE = pa_report.UNSTABLE
LOOSE_STABILITY = float(pa_report.LOOSE_STABILITY)  # a second try's criterion
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                detail = tail(log) if log else ""
                sys.exit(f"server exited with code {proc.returncode} before ready:\n{detail}")
            try:
                if client.is_server_ready(client_timeout=2.0):
                    return
            except Exception:
                pass  # not listening yet
            time.sleep(0.2)
    finally:
        client.close()
    sys.exit(f"server at {url} not ready after {READY_TIMEOUT_S:.0f} s")


@contextmanager
def local_server(log: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "serve", "serve", "--host", "127.0.0.1", "--grpc-port", str(port)]
    cmd += ["--http-port", str(free_port())]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"127.0.0.1:{port}"
        wait_ready(url, proc, log)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print("server ignored SIGTERM; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


@contextmanager
def remote_server(url: str) -> Iterator[str]:
    wait_ready(url, None, None)
    yield url


def run_one(
    exe: Path, url: str, model: str, concurrency: int, ms: int, stability: float, work: Path
) -> dict[str, Any]:
    """One concurrency. Where perf_analyzer finds no ``stability`` % stable windows in its ten
    (a noisy shared machine), it is run once more at LOOSE_STABILITY, and the row says so."""
    result = _run_at(exe, url, model, concurrency, ms, stability, work)
    if stability < LOOSE_STABILITY and UNSTABLE in result.get("error", ""):
        print(
            f"{model}: concurrency {concurrency}: no stable measurement within "
            f"{stability:g} %; once more within {LOOSE_STABILITY:g} %",
            file=sys.stderr,
            flush=True,
        )
        result = _run_at(exe, url, model, concurrency, ms, LOOSE_STABILITY, work)
    return result


def _run_at(
    exe: Path, url: str, model: str, concurrency: int, ms: int, stability: float, work: Path
) -> dict[str, Any]:
    csv_path = work / f"{model}-c{concurrency}.csv"
    cmd = [
        str(exe),
        *("-m", model, "-i", "grpc", "-u", url),
        *("--concurrency-range", f"{concurrency}:{concurrency}"),
        *("--measurement-interval", str(ms), "-f", str(csv_path)),
        f"--stability-percentage={stability:g}",
    ]
    # Stabilisation takes 3 to 10 windows; allow all of them plus start-up.
    timeout = 60 + 12 * ms / 1000
    try:
        res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"concurrency": concurrency, "error": f"perf_analyzer timed out after {timeout} s"}
    if res.returncode != 0 or not csv_path.exists():
        output = "\n".join((res.stdout + res.stderr).strip().splitlines()[-20:])
        return {"concurrency": concurrency, "error": f"rc={res.returncode}: {output}"}
    try:
        figures = pa_report.parse_csv(csv_path.read_text(), concurrency)
    except ValueError as error:
        return {"concurrency": concurrency, "error": str(error)}
    return {
        "concurrency": concurrency,
        "throughput_infer_per_s": figures.pop("throughput"),
        "stability_percentage": stability,
        **figures,
    }


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": provenance.git_state(),
    }


def print_table(model: str, results: list[dict[str, Any]]) -> None:
    print(f"\nmodel {model}")
    print(f"{'conc':>5} {'infer/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['concurrency']:>5} ERROR {r['error'].splitlines()[-1]}")
        else:
            print(
                f"{r['concurrency']:>5} {r['throughput_infer_per_s']:>10.1f} "
                f"{r['p50_ms']:>8.3f} {r['p95_ms']:>8.3f} {r['p99_ms']:>8.3f}"
                + (
                    f"  (stable within {r['stability_percentage']:g} %)"
                    if r.get("stability_percentage", 0) >= LOOSE_STABILITY
                    else ""
                )
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="mlp_onnx")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--measurement-ms", type=int, default=3000)
    ap.add_argument(
        "--stability-percentage", type=float, default=10.0, help="perf_analyzer's (default 10)"
    )
    ap.add_argument("--url", help="host:port of a running server (default: start one)")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--perf-analyzer", type=Path, default=PERF_ANALYZER)
    args = ap.parse_args(argv)
    stability: float = args.stability_percentage
    # Turn SIGTERM (CI timeouts) into SystemExit so the finally blocks stop the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    exe: Path = args.perf_analyzer
    if not os.access(exe, os.X_OK):
        sys.exit(f"perf_analyzer not found at {exe}; run: bash benchmarks/install_perf_analyzer.sh")
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)

    results: list[dict[str, Any]] = []
    target = ""
    with tempfile.TemporaryDirectory(prefix="perf_analyzer_") as tmp:
        work = Path(tmp)
        server = local_server(work / "server.log") if args.url is None else remote_server(args.url)
        with server as url:
            target = url
            for c in args.concurrency:
                print(f"{args.model}: concurrency {c} ...", file=sys.stderr, flush=True)
                r = run_one(exe, url, args.model, c, args.measurement_ms, stability, work)
                if "error" in r:
                    print(f"perf_analyzer failed:\n{r['error']}", file=sys.stderr)
                results.append(r)
            if args.url is None and any("error" in r for r in results):
                print(f"server log tail:\n{tail(work / 'server.log')}", file=sys.stderr)

    print_table(args.model, results)
    if args.json:
        report = {
            "model": args.model,
            "url": target,
            "server": "external" if args.url else "started by this script",
            "measurement_ms": args.measurement_ms,
            "stability_percentage": stability,
            "perf_analyzer": (version.stdout + version.stderr).strip(),
            "machine": machine_info(),
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
