"""The GPU benchmark: ResNet-50 fp16 (uint8 224×224×3 in, normalisation inside the model) and a
BERT-base-like encoder (seq 128), in-process eager and CUDA-graph floors per batch size, then the
same models through warmserve at concurrency 1–64, with the batch sizes the batcher formed.

    python -m benchmarks.gpu_bench --out DIR                 # on the GPU machine (cuda:0)
    python -m benchmarks.gpu_bench --out DIR --profile-at 64 # + the front end under py-spy
    python -m benchmarks.gpu_bench --smoke --device cpu      # tiny models on CPU: checks the script
    python -m benchmarks.gpu_bench --out DIR --frontends-only --frontends 2,4 --levels 32,64
                                        # ResNet-50 through --frontends relays alone

Writes DIR/gpu_bench.json and prints markdown tables for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import loadgen, proctree
from benchmarks.compare import FloorProcess, exit_on_sigterm
from benchmarks.gpu_models import image_model, save_model_folder, text_model
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import write_config
from tests.integration.harness import ServerProcess, wait_until

BATCHES = (1, 2, 4, 8, 16, 32, 64)  # the batcher's default buckets up to max_batch_size 64
CLIENT_WARM_CALLS = 20
CALLERS_PER_CLIENT_PROCESS = 8


def _time_ms(fn: Any, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def floors(
    module: torch.nn.Module, example: Any, device: str, batches: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Eager and (on CUDA) CUDA-graph milliseconds per batch, in process, no serving."""
    rows = []
    with torch.inference_mode():
        for batch in batches:
            x = example(batch)
            for _ in range(3):
                module(x)
            eager = _time_ms(lambda x=x: module(x), device, 20)
            graph = None
            if device.startswith("cuda"):
                static = x.clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    module(static)
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    module(static)
                graph = _time_ms(g.replay, device, 50)
            rows.append({"batch": batch, "eager_ms": eager, "graph_ms": graph})
            print(
                f"  floor batch {batch:3d}: eager {eager:.2f} ms, "
                f"graph {graph or float('nan'):.2f} ms"
            )
    return rows


def payload(model: str, name: str, array: np.ndarray, datatype: str) -> bytes:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    message.raw_input_contents.append(array.tobytes())
    return cast(bytes, message.SerializeToString())


def first_requests(url: str, bodies: dict[str, bytes], warm_calls: int) -> dict[str, Any]:
    """Per model: the first request after the server reports ready, against the warm p50 of the
    next ``warm_calls`` on the same channel. The client's own first calls are warmed first on a
    model that does not exist (NOT_FOUND touches no batcher or worker)."""
    out: dict[str, Any] = {}
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(loadgen.METHOD)
        unknown = pb.ModelInferRequest.FromString(next(iter(bodies.values())))
        unknown.model_name = "no-such-model"
        for _ in range(CLIENT_WARM_CALLS):
            with contextlib.suppress(grpc.RpcError):
                call(unknown.SerializeToString(), timeout=loadgen.CALL_TIMEOUT_S)
        for model, body in bodies.items():
            times = []
            for _ in range(1 + warm_calls):
                start = time.perf_counter()
                call(body, timeout=loadgen.CALL_TIMEOUT_S)
                times.append((time.perf_counter() - start) * 1e3)
            warm_p50 = statistics.median(times[1:])
            out[model] = {
                "first_ms": times[0],
                "warm_p50_ms": warm_p50,
                "first_over_warm_p50": times[0] / warm_p50,
            }
            print(
                f"  {model}: first request after ready {times[0]:.2f} ms, warm p50 "
                f"{warm_p50:.2f} ms ({times[0] / warm_p50:.2f}×)"
            )
    return out


def _per_call_us(after: Any, before: Any, name: str) -> float:
    """Average µs per request of one statistics Duration between two ModelStatistics snapshots
    (the protocol counts compute durations per request, like queue time)."""
    a, b = getattr(after, name), getattr(before, name)
    ns: int = a.ns - b.ns
    calls: int = a.count - b.count
    return ns / max(1, calls) / 1e3


def _cpu(pid: int) -> tuple[float, dict[str, float]]:
    return time.monotonic(), proctree.thread_cpu_seconds(pid)


def _busy(
    start: tuple[float, dict[str, float]], end: tuple[float, dict[str, float]], wall: float
) -> Any:
    """The front-end process's CPU over a load of ``wall`` seconds (the window around it adds
    only idle time): cores in all, and its busiest thread's share."""
    used = {k: v - start[1].get(k, 0.0) for k, v in end[1].items()}
    busiest = max(used, key=lambda k: used[k])
    return {
        "cores": sum(used.values()) / wall,
        "busiest_thread": busiest.split("/")[0],
        "busiest_share": used[busiest] / wall,
    }


def _profile_start(pid: int, seconds: float, path: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the server's threads for ``seconds`` into ``path`` (raw), or None without
    py-spy on PATH."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("  (py-spy not found: no profile)")
        return None
    command = [spy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "250"]
    # Not --native: on the H200 host it paused the server per sample and got ~50 samples in 3 s.
    # Without it, time in C code shows as the Python frame that called it.
    command += ["-f", "raw", "-o", str(path), "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _profile_summary(spy: subprocess.Popen[bytes], path: Path, top: int = 12) -> None:
    """Wait for py-spy, then print where the event-loop thread's samples fell: leaf frames (C
    code shows as the Python frame that called it) and our own functions, inclusive."""
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        print("  (py-spy did not finish: no profile)")
        return
    leaves: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or not any("runners.py" in f for f in frames):
            continue  # not the event-loop thread
        total += int(count)
        leaves[frames[-1]] += int(count)
        for frame in set(frames):
            if "(serve/" in frame or "/serve/" in frame:
                ours[frame] += int(count)
    if not total:
        print("  (no event-loop samples)")
        return
    print(f"  event-loop thread profile ({total} samples), leaf frames:")
    for frame, samples in leaves.most_common(top):
        print(f"    {samples / total:6.1%} {frame[:110]}")
    print("  warmserve functions, inclusive:")
    for frame, samples in ours.most_common(top):
        print(f"    {samples / total:6.1%} {frame[:110]}")


def _load_level(
    url: str, pid: int, model: str, body: bytes, level: int, seconds: float,
    streaming: bool = False,
) -> tuple[loadgen.LoadResult, dict[str, Any], int]:  # fmt: skip
    """One closed-loop level (client processes of CALLERS_PER_CLIENT_PROCESS callers each; with
    ``streaming``, each caller on a ModelStreamInfer stream) and the server process's CPU."""
    processes = max(1, level // CALLERS_PER_CLIENT_PROCESS)
    cpu_before = _cpu(pid)
    result = loadgen.run(
        url, model, concurrency=level, seconds=seconds, payload=body, processes=processes,
        streaming=streaming,
    )  # fmt: skip
    return result, _busy(cpu_before, _cpu(pid), result.seconds), processes


def serve_and_load(
    root: Path, models: dict[str, bytes], levels: dict[str, list[int]], seconds: float,
    out_dir: Path, profile_at: int = 0, streamed: dict[str, list[int]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The models through warmserve at each level; ``streamed``: levels per model run again
    with streaming clients (``<model>_streamed``); with ``profile_at``, an extra pass of the
    first model at that concurrency under py-spy (not counted in the figures)."""
    started = time.monotonic()
    server = ServerProcess(root / "server.log", root / "repo")
    out: dict[str, Any] = {}
    try:
        server.wait_ready(timeout=600)
        out["start_to_ready_s"] = time.monotonic() - started
        print(f"  ready {out['start_to_ready_s']:.1f} s after the server process started")
        out["first_request"] = first_requests(server.url, models, 200)
        pid = server.process.pid
        for model, body in models.items():
            rows = []
            loadgen.run(server.url, model, concurrency=4, seconds=1.0, payload=body)
            for level in levels[model]:
                before = server.client.get_inference_statistics(model).model_stats[0]
                result, front_end, processes = _load_level(
                    server.url, pid, model, body, level, seconds
                )
                after = server.client.get_inference_statistics(model).model_stats[0]
                stats = after.inference_stats
                old = before.inference_stats
                batches = after.execution_count - before.execution_count
                rows_per_batch = (after.inference_count - before.inference_count) / max(1, batches)
                row = {
                    **result.summary(),
                    "rows_per_batch": rows_per_batch,
                    "client_processes": processes,
                    "server_request_us": _per_call_us(stats, old, "success"),
                    "queue_us": _per_call_us(stats, old, "queue"),
                    "input_us": _per_call_us(stats, old, "compute_input"),
                    "infer_us": _per_call_us(stats, old, "compute_infer"),
                    "output_us": _per_call_us(stats, old, "compute_output"),
                    "front_end": front_end,
                }
                rows.append(row)
                print(
                    f"  {model} c={level:3d}: {result.throughput:8.0f}/s p50 {result.p50_ms:.2f} "
                    f"p95 {result.p95_ms:.2f} p99 {result.p99_ms:.2f} ms, "
                    f"{rows_per_batch:.1f} rows/batch, {result.errors} errors | server "
                    f"{row['server_request_us']:.0f} µs/request (queue {row['queue_us']:.0f}), "
                    f"compute in {row['input_us']:.0f} infer {row['infer_us']:.0f} "
                    f"out {row['output_us']:.0f} µs | front end {front_end['cores']:.2f} "
                    f"cores, {front_end['busiest_thread']} {front_end['busiest_share']:.0%}"
                )
            out[model] = rows
            streamed_rows = []
            for level in (streamed or {}).get(model, []):
                rows0, batches0 = _batch_rows(server, model)
                result, front_end, processes = _load_level(
                    server.url, pid, model, body, level, seconds, streaming=True
                )
                rows1, batches1 = _batch_rows(server, model)
                rows_per_batch = (rows1 - rows0) / max(1.0, batches1 - batches0)
                streamed_rows.append({
                    **result.summary(), "rows_per_batch": rows_per_batch,
                    "client_processes": processes, "front_end": front_end,
                })  # fmt: skip
                print(
                    f"  {model} c={level:3d} streaming: {result.throughput:8.0f}/s p50 "
                    f"{result.p50_ms:.2f} p95 {result.p95_ms:.2f} p99 {result.p99_ms:.2f} ms, "
                    f"{rows_per_batch:.1f} rows/batch, "
                    f"{result.errors} errors | front end {front_end['cores']:.2f} cores, "
                    f"{front_end['busiest_thread']} {front_end['busiest_share']:.0%}"
                )
            if streamed_rows:
                out[f"{model}_streamed"] = streamed_rows
            if profile_at and model == next(iter(models)):  # a pass of its own: py-spy slows it
                profile = out_dir / f"profile_{model}_c{profile_at}.txt"
                spy = _profile_start(pid, seconds, profile)
                if spy is not None:
                    _load_level(server.url, pid, model, body, profile_at, seconds)
                    _profile_summary(spy, profile)
            breakdown = server.http_json(f"/warmserve/models/{model}/latency")[1]["breakdown_us"]
            out[f"{model}_breakdown_us"] = breakdown
            print(
                f"  {model} breakdown over all levels (µs; codec and queue per request, the rest "
                "per batch): " + ", ".join(f"{k} {v:.0f}" for k, v in breakdown.items())
            )
        out["log_warm_lines"] = [ln for ln in server.log().splitlines() if "warm" in ln]
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            shutil.copy(root / "server.log", out_dir / "gpu_bench_server.log")
    return out


def _batch_rows(server: ServerProcess, model: str) -> tuple[float, float]:
    """(rows, batches) sent to workers so far, from the server's /metrics."""
    rows = batches = 0.0
    for family in text_string_to_metric_families(server.http_text("/metrics")[1]):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == "warmserve_batch_rows_sum":
                rows += sample.value
            elif sample.name == "warmserve_batch_rows_count":
                batches += sample.value
    return rows, batches


def serve_frontends(
    root: Path, model: str, body: bytes, counts: list[int], levels: list[int], seconds: float,
    out_dir: Path, slots: int = 0, streaming: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """``model`` through 1, 2, ... gRPC processes (``--frontends``: relays sharing the port that
    pass every call to the one serving process and its pool), every caller on a connection of
    its own: the kernel spreads connections, not calls, over the relays. ``slots``: batches in
    flight per worker (0: the model's setting); ``streaming``: each caller on a stream."""
    out: dict[str, Any] = {}
    for count in counts:
        repo = root / f"repo-frontends-{count}"
        shutil.copytree(root / "repo" / model, repo / model)
        if slots:
            config = tomllib.loads((repo / model / "model.toml").read_text())
            pool = {**config["pool"], "max_inflight_per_worker": slots}
            write_config(repo / model, {**config, "pool": pool})
        args = ("--frontends", str(count)) if count > 1 else ()
        log = root / f"server-frontends-{count}.log"
        server = ServerProcess(log, repo, args=args)
        started = time.monotonic()
        rows_out = []
        try:
            wait_until(server.ready_over_http, 600, f"{count} gRPC processes ready")
            print(f"  {count} gRPC process(es) ready after {time.monotonic() - started:.1f} s")
            loadgen.run(server.url, model, concurrency=16, seconds=1.0, payload=body,
                        processes=2, connections=CALLERS_PER_CLIENT_PROCESS)  # fmt: skip
            for level in levels:
                processes = max(1, level // CALLERS_PER_CLIENT_PROCESS)
                rows0, batches0 = _batch_rows(server, model)
                cpu0 = proctree.tree_cpu_seconds(server.process.pid)
                threads0 = _cpu(server.process.pid)
                result = loadgen.run(
                    server.url, model, concurrency=level, seconds=seconds, payload=body,
                    processes=processes, connections=CALLERS_PER_CLIENT_PROCESS,
                    streaming=streaming,
                )  # fmt: skip
                cores = (proctree.tree_cpu_seconds(server.process.pid) - cpu0) / result.seconds
                serving = _busy(threads0, _cpu(server.process.pid), result.seconds)
                rows1, batches1 = _batch_rows(server, model)
                row = {
                    **result.summary(),
                    "frontends": count,
                    "streaming": streaming,
                    "serving_process": serving,
                    "rows_per_batch": (rows1 - rows0) / max(1.0, batches1 - batches0),
                    "server_cores": cores,
                }
                rows_out.append(row)
                print(
                    f"  {model}, {count} gRPC process(es), c={level:3d}"
                    f"{' streaming' if streaming else ''}: "
                    f"{result.throughput:8.0f}/s p50 {result.p50_ms:.2f} p95 {result.p95_ms:.2f} "
                    f"p99 {result.p99_ms:.2f} ms, "
                    f"{row['rows_per_batch']:.1f} rows/batch, {result.errors} errors | server "
                    f"tree {cores:.2f} cores; serving process {serving['cores']:.2f} cores, "
                    f"busiest thread {serving['busiest_share']:.0%}"
                )
        finally:
            server.stop()
            with contextlib.suppress(OSError):
                shutil.copy(log, out_dir / log.name)
        out[str(count)] = rows_out
    return out


def grpc_floor(
    root: Path, bodies: dict[str, tuple[bytes, int]], levels: list[int], seconds: float
) -> dict[str, Any]:
    """The same calls against a bare grpc.aio server that parses each and answers with zeros of
    the model's output size (no model, no batching): what one Python gRPC process takes here."""
    out: dict[str, Any] = {}
    for model, (body, reply_bytes) in bodies.items():
        floor = FloorProcess(root / "repo" / model, root / f"echo-{model}.log", echo=reply_bytes)
        rows = []
        try:
            loadgen.run(floor.url, model, concurrency=4, seconds=0.5, payload=body)
            for level in levels:
                result, front_end, _ = _load_level(
                    floor.url, floor.process.pid, model, body, level, seconds
                )
                rows.append({**result.summary(), "front_end": front_end})
                print(
                    f"  gRPC floor, {model} payload, c={level:3d}: {result.throughput:8.0f}/s "
                    f"p50 {result.p50_ms:.2f} p95 {result.p95_ms:.2f} ms | "
                    f"{front_end['cores']:.2f} cores, {front_end['busiest_thread']} "
                    f"{front_end['busiest_share']:.0%}"
                )
        finally:
            floor.stop()
        out[model] = rows
    return out


def _interpolate(floor: list[dict[str, Any]], key: str, batch: float) -> float:
    """Milliseconds per batch of ``batch`` rows, linear between the measured batch sizes."""
    points = [(row["batch"], row[key]) for row in floor if row[key] is not None]
    for (b0, ms0), (b1, ms1) in itertools.pairwise(points):
        if b0 <= batch <= b1:
            return float(ms0 + (ms1 - ms0) * (batch - b0) / (b1 - b0))
    return float(points[0][1] if batch < points[0][0] else points[-1][1])


def targets(results: dict[str, Any], model: str, floor_key: str) -> dict[str, Any]:
    """The issue's GPU targets as ratios: the highest concurrency against the in-process
    CUDA-graph throughput at the batch size the batcher formed, p95 against that batch's
    compute time, c=1 p50 against the graph's batch-1 time + 1 ms, first request after ready
    against the warm p50."""
    floor = results[floor_key]
    key = "graph_ms" if floor[0]["graph_ms"] is not None else "eager_ms"
    rows = results["served"][model]
    top = rows[-1]
    batch = max(1.0, top["rows_per_batch"])
    compute_ms = _interpolate(floor, key, batch)
    floor_rate = batch / compute_ms * 1e3
    first = results["served"]["first_request"][model]
    out = {
        "model": model,
        "floor": key,
        "top_concurrency": top["level"],
        "rows_per_batch": batch,
        "floor_ms_at_that_batch": compute_ms,
        "floor_throughput_at_that_batch": floor_rate,
        "throughput_over_floor": top["throughput"] / floor_rate,
        "p95_over_compute": top["p95_ms"] / compute_ms,
        "first_over_warm_p50": first["first_over_warm_p50"],
    }
    line = (
        f"  {model}: c={top['level']} {top['throughput']:.0f}/s at {batch:.1f} rows/batch = "
        f"{out['throughput_over_floor']:.2f}× the in-process {key[:-3]} floor at that batch "
        f"({floor_rate:.0f}/s; target ≥ 0.70); p95 {top['p95_ms']:.2f} ms = "
        f"{out['p95_over_compute']:.2f}× its compute ({compute_ms:.2f} ms; target < 3); "
    )
    if rows[0]["level"] == 1:
        out["c1_p50_ms"] = rows[0]["p50_ms"]
        out["c1_budget_ms"] = _interpolate(floor, key, 1) + 1.0
        line += f"c=1 p50 {out['c1_p50_ms']:.2f} ms against {out['c1_budget_ms']:.2f} ms "
        line += "(compute + 1 ms); "
    print(line + f"first request {out['first_over_warm_p50']:.2f}× warm p50 (target ≤ 1.5)")
    streamed = results["served"].get(f"{model}_streamed") or []
    if streamed and "rows_per_batch" in streamed[-1]:  # (older files lack it)
        top = streamed[-1]
        batch = max(1.0, top["rows_per_batch"])
        compute_ms = _interpolate(floor, key, batch)
        floor_rate = batch / compute_ms * 1e3
        out["streamed"] = {
            "top_concurrency": top["level"],
            "rows_per_batch": batch,
            "throughput_over_floor": top["throughput"] / floor_rate,
            "p95_over_compute": top["p95_ms"] / compute_ms,
        }
        line = (
            f"  {model}, streaming clients: c={top['level']} {top['throughput']:.0f}/s at "
            f"{batch:.1f} rows/batch = {out['streamed']['throughput_over_floor']:.2f}× the floor "
            f"at that batch; p95 {top['p95_ms']:.2f} ms = "
            f"{out['streamed']['p95_over_compute']:.2f}× its compute ({compute_ms:.2f} ms)"
        )
        if streamed[0]["level"] == 1:
            out["streamed"]["c1_p50_ms"] = streamed[0]["p50_ms"]
            line += f"; c=1 p50 {streamed[0]['p50_ms']:.2f} ms"
        print(line)
    return out


def frontend_targets(results: dict[str, Any], floor_key: str) -> list[dict[str, Any]]:
    """The c=64 targets for each gRPC process count: p95 against the compute time of the
    batch formed, throughput against the in-process floor at that batch."""
    floor = results[floor_key]
    key = "graph_ms" if floor[0]["graph_ms"] is not None else "eager_ms"
    out = []
    for count, rows in results["frontends"].items():
        top = rows[-1]
        batch = max(1.0, top["rows_per_batch"])
        compute_ms = _interpolate(floor, key, batch)
        floor_rate = batch / compute_ms * 1e3
        entry = {
            "frontends": int(count),
            "top_concurrency": top["level"],
            "rows_per_batch": batch,
            "floor_ms_at_that_batch": compute_ms,
            "throughput_over_floor": top["throughput"] / floor_rate,
            "p95_over_compute": top["p95_ms"] / compute_ms,
        }
        out.append(entry)
        print(
            f"  {count} gRPC process(es): c={top['level']} {top['throughput']:.0f}/s at "
            f"{batch:.1f} rows/batch = {entry['throughput_over_floor']:.2f}× the {key[:-3]} "
            f"floor at that batch; p95 {top['p95_ms']:.2f} ms = "
            f"{entry['p95_over_compute']:.2f}× its compute ({compute_ms:.2f} ms; target < 3)"
        )
    return out


def main() -> None:
    exit_on_sigterm()  # (a timeout's SIGTERM) the servers it started are stopped on the way out
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--smoke", action="store_true", help="tiny models and loads (CPU check)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--seconds", type=float, help="per load level (default 3; smoke 1)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--profile-at", type=int, default=0, help="py-spy the server at this concurrency (0: no)"
    )
    parser.add_argument(
        "--frontends", default="", help="gRPC process counts for ResNet-50 (default 1,4)"
    )
    parser.add_argument(
        "--frontends-only",
        action="store_true",
        help="only the ResNet-50 floor and the gRPC process counts (a short second run)",
    )
    parser.add_argument(
        "--slots", type=int, default=0, help="batches in flight per worker in the --frontends runs"
    )
    parser.add_argument(
        "--frontends-streaming",
        action="store_true",
        help="streaming clients (ModelStreamInfer) in the --frontends runs",
    )
    parser.add_argument(
        "--idle-spin-us",
        type=float,
        default=None,
        help="pool.idle_spin_us of every model: workers busy-poll this long for the next batch "
        "(default: the config's default, -1: 2000 µs on CUDA, 0 on CPU)",
    )
    parser.add_argument("--levels", default="", help="concurrency levels (default 1,4,16,32,64)")
    parser.add_argument(
        "--streaming-levels",
        default=None,
        help="levels run again with streaming clients, ResNet-50 and encoder (default: the "
        "lowest and highest level; '' for none)",
    )
    args = parser.parse_args()
    only = args.frontends_only
    device, small = args.device, args.smoke
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    size, seq = (64, 16) if small else (224, 128)
    batches = (1, 4) if small else BATCHES
    levels = [int(c) for c in (args.levels or ("1,4,16" if small else "1,4,16,32,64")).split(",")]
    variant_levels = levels[-2:]
    max_batch = 8 if small else 64
    seconds = args.seconds or (1.0 if small else 3.0)
    results: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "smoke": small,
        "idle_spin_us": args.idle_spin_us,
    }  # fmt: skip
    if device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(0)
    image = image_model(device, dtype, size, small)
    text = text_model(device, dtype, small, seq)
    vocab = text.tokens.num_embeddings

    def images(b: int) -> torch.Tensor:
        return torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, device=device)

    def tokens(b: int) -> torch.Tensor:
        return torch.randint(0, vocab, (b, seq), dtype=torch.int64, device=device)

    print(f"{results.get('gpu', device)}: in-process floors")
    results["floor_resnet50"] = floors(image, images, device, batches)
    if not only:
        results["floor_encoder"] = floors(text, tokens, device, batches)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = {
            "workers": args.workers,
            "threads": 1 if device == "cpu" else 0,
            "startup_timeout_s": 600,
        }
        if args.idle_spin_us is not None:  # (else the model's default: -1, auto)
            pool["idle_spin_us"] = args.idle_spin_us
        common = {"max_batch_size": max_batch, "device": device, "pool": pool}
        resnet = {
            **common,
            "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [size, size, 3]}],
            "outputs": [{"name": "LOGITS", "datatype": "FP32", "shape": [1000]}],
        }
        save_model_folder(root / "repo" / "resnet50", "resnet50", image, images(1), resnet)
        # The same model with one batch in flight per worker (the default is two): batches
        # form only when a worker is free, so they grow with the load.
        shutil.copytree(root / "repo" / "resnet50", root / "repo" / "resnet50_one_slot")
        write_config(root / "repo" / "resnet50_one_slot", {
            "name": "resnet50_one_slot", "backend": "torch", "model_file": "model.pt", **resnet,
            "pool": {**pool, "max_inflight_per_worker": 1},
        })  # fmt: skip
        width = text.positions.shape[-1]
        save_model_folder(
            root / "repo" / "encoder", "encoder", text, tokens(1), {
                **common,
                "inputs": [{"name": "IDS", "datatype": "INT64", "shape": [seq]}],
                "outputs": [{"name": "CLS", "datatype": "FP32", "shape": [width]}],
            },
        )  # fmt: skip
        del image, text
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        rng = np.random.default_rng(0)
        image_array = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        bodies = {
            "resnet50": payload("resnet50", "IMAGE", image_array, "UINT8"),
            "encoder": payload(
                "encoder", "IDS", rng.integers(0, vocab, (1, seq), dtype=np.int64), "INT64"
            ),
            "resnet50_one_slot": payload("resnet50_one_slot", "IMAGE", image_array, "UINT8"),
        }
        model_levels = {"resnet50": levels, "encoder": levels, "resnet50_one_slot": variant_levels}
        args.out.mkdir(parents=True, exist_ok=True)
        save = functools.partial(_save, results, args.out / "gpu_bench.json")
        save()  # each section adds to the file: a run cut short by its time limit keeps the rest
        if not only:
            print("through warmserve")
            wanted = args.streaming_levels
            streaming_levels = (
                [levels[0], levels[-1]]
                if wanted is None
                else [int(c) for c in wanted.split(",") if c]
            )
            streamed = {"resnet50": streaming_levels, "encoder": streaming_levels}
            results["served"] = serve_and_load(
                root, bodies, model_levels, seconds, args.out, args.profile_at, streamed
            )
            save()
            print("the gRPC floor (no model) with the same payloads")
            results["grpc_floor"] = grpc_floor(
                root,
                {"resnet50": (bodies["resnet50"], 4000), "encoder": (bodies["encoder"], width * 4)},
                [1, 16, 64] if not small else [1, 4],
                seconds,
            )
            save()
        print("ResNet-50 through relay processes sharing the port (--frontends)")
        counts = [int(c) for c in (args.frontends or ("1,2" if small else "1,4")).split(",")]
        # The full run measures the target's level alone here, to stay inside its 8 minutes.
        frontend_levels = levels if only else levels[-2:] if small else levels[-1:]
        results["frontends"] = serve_frontends(
            root, "resnet50", bodies["resnet50"], counts, frontend_levels, seconds, args.out,
            args.slots, args.frontends_streaming,
        )  # fmt: skip
    print("against the targets")
    if not only:
        results["targets"] = [
            targets(results, "resnet50", "floor_resnet50"),
            targets(results, "encoder", "floor_encoder"),
            targets(results, "resnet50_one_slot", "floor_resnet50"),
        ]
    results["frontend_targets"] = frontend_targets(results, "floor_resnet50")
    save()
    print(f"wrote {args.out / 'gpu_bench.json'}")


def _save(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
