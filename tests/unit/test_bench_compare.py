"""make bench's report from synthetic rows and reports: perf_analyzer's CSV read by column (2.51's
own output, rows out of order, other versions' extra columns and sections), a failed
perf_analyzer run kept as a failure, runs with errors listed, and ratios to a run without
answers NaN instead of a crash."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest

from benchmarks import compare, loadgen, pa_report

# perf_analyzer 2.51 against the floor server, --concurrency-range 1:2 (rows by throughput)
PA_251 = """\
Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,p95 latency,\
p99 latency
2,1348.69,3,1,845,2394,5317,9719
1,1496.81,3,1,549,645,807,3734
"""
# against a server that counts its statistics, with a later section after a blank line
PA_SERVER_COLUMNS = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,\
Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,\
p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
16,5210.5,12,300,40,5,800,4,2,3050,3600,3900,4800,3100,310,2790

Concurrency,Avg GPU Utilization,Avg GPU Power Usage
16,gpu0:0.5;,gpu0:100;
"""


def test_perf_analyzers_report_is_read_by_column_and_by_concurrency():
    assert pa_report.parse_csv(PA_251, 1) == {
        "throughput": 1496.81,
        "p50_ms": 0.549,
        "p90_ms": 0.645,
        "p95_ms": 0.807,
        "p99_ms": 3.734,
    }
    assert pa_report.parse_csv(PA_251, 2)["p99_ms"] == 9.719
    figures = pa_report.parse_csv(PA_SERVER_COLUMNS, 16)
    assert figures["throughput"] == 5210.5 and figures["p50_ms"] == 3.05


def test_a_report_without_the_row_or_a_column_says_what_is_missing():
    with pytest.raises(ValueError, match="0 rows for concurrency 16"):
        pa_report.parse_csv(PA_251, 16)
    with pytest.raises(ValueError, match="p99 latency"):
        pa_report.parse_csv("Concurrency,Inferences/Second,p50 latency\n1,10,500\n", 1)


def test_a_failed_perf_analyzer_run_is_kept_as_a_failure(tmp_path):
    report = tmp_path / "pa.csv"
    fails = [
        sys.executable,
        "-c",
        "import sys; print('Failed to obtain stable measurement'); sys.exit(1)",
    ]
    failed = compare._perf_analyzer_result(fails, report, 1, timeout=60)
    assert "exited with 1" in failed["error"] and "stable measurement" in failed["error"]
    hangs = [sys.executable, "-c", "import time; time.sleep(60)"]
    hung = compare._perf_analyzer_result(hangs, report, 1, timeout=0.2)
    assert "timed out" in hung["error"]
    report.write_text("Concurrency,Inferences/Second\n1,10\n")
    writes = [sys.executable, "-c", "pass"]
    unreadable = compare._perf_analyzer_result(writes, report, 1, timeout=60)
    assert "p50 latency" in unreadable["error"]
    report.write_text(PA_251)
    assert compare._perf_analyzer_result(writes, report, 2, timeout=60)["throughput"] == 1348.69


def row(level: int, latencies: list[float], errors: int = 0, cpu: float = 50.0) -> dict:
    data = loadgen._result("closed", level, 1.0, latencies, errors).summary()
    return {**data, "server_cpu_us_per_call": cpu if latencies else math.nan}


def test_runs_with_errors_are_listed_with_failed_perf_analyzer_runs():
    results = {
        "floor": {"closed": [row(1, [0.001] * 10)], "open": [], "perf_analyzer": {1: None}},
        "warmserve": {
            "closed": [row(1, [0.001] * 10), row(16, [0.002] * 8, errors=3)],
            "open": [{**row(500, [0.002] * 5, errors=2), "mode": "open"}],
            "perf_analyzer": {1: {"throughput": 1.0}, 16: {"error": "perf_analyzer timed out"}},
        },
    }
    assert compare._runs_with_errors(results) == [
        "warmserve closed 16: 3 errors",
        "warmserve open 500: 2 errors",
        "warmserve perf_analyzer c=16: perf_analyzer timed out",
    ]
    assert "3 ERRORS" in compare._warnings(results["warmserve"]["closed"][1])
    assert "fewer than 1000 calls" in compare._warnings(results["warmserve"]["closed"][1])


def test_ratios_to_a_run_without_answers_are_nan_and_do_not_end_the_report():
    dead = row(16, [], errors=100, cpu=0.0)
    results = {
        "floor": {"closed": [row(1, [0.001] * 10), dead], "open": []},
        "warmserve": {"closed": [row(1, [0.002] * 10), row(16, [0.003] * 10)], "open": []},
    }
    ratios = compare._ratios(results)
    assert ratios["c1_p50_vs_floor"] == pytest.approx(2.0)
    assert math.isnan(ratios["c16_throughput_vs_floor"])
    assert math.isnan(ratios["c16_p99_vs_floor"])


def test_the_json_record_has_null_for_figures_of_runs_without_answers(tmp_path: Path):
    import json

    record = {"warmserve": {"closed": [row(16, [], errors=4)]}}
    text = json.dumps(loadgen.json_safe(record), allow_nan=False)
    assert json.loads(text)["warmserve"]["closed"][0]["p99_ms"] is None


def test_the_record_names_the_machine_the_commit_and_the_settings():
    import argparse
    import re
    import subprocess

    machine = compare._machine()
    assert machine["cpu"] and machine["cores"] >= 1 and machine["cpu_count"] >= machine["cores"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", machine["date"])
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=compare.ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert machine["git"]["commit"] == head and isinstance(machine["git"]["dirty"], bool)
    args = argparse.Namespace(
        quick=False, seconds=3.0, rounds=3, concurrency=[1, 16], rates=[500.0], peers=None
    )
    settings = compare._settings(args)
    assert settings["concurrency"] == [1, 16] and settings["open_loop_rates"] == [500.0]
    assert settings["seconds"] == 3.0 and settings["rounds"] == 3
    assert settings["warm_up"] == {"concurrency": 4, "seconds": 1.0}
    assert "linear" in settings["percentiles"]


def test_a_floor_server_that_exits_at_start_fails_at_once_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match="floor server exited") as failure:
        compare.FloorProcess(tmp_path / "no-such-model", tmp_path / "floor.log")
    assert "no-such-model" in str(failure.value)  # its own error, from its log


def test_a_floor_server_that_ignores_sigterm_is_killed_when_stopped(tmp_path):
    import signal
    import subprocess

    floor = object.__new__(compare.FloorProcess)
    ready = tmp_path / "ready"
    code = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path(sys.argv[1]).touch()\n"
        "while True: time.sleep(1)\n"
    )
    floor._log = (tmp_path / "floor.log").open("wb")
    floor.process = subprocess.Popen([sys.executable, "-c", code, str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():  # its SIGTERM handler is in place
            assert time.monotonic() < deadline
            time.sleep(0.01)
        floor.stop(timeout=0.2)
        assert floor.process.returncode == -signal.SIGKILL and floor._log.closed
    finally:
        if floor.process.poll() is None:
            floor.process.kill()
            floor.process.wait(10)


def test_sigterm_ends_the_benchmark_as_an_exception_so_its_servers_are_stopped():
    import os
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    try:
        compare.exit_on_sigterm()
        with pytest.raises(SystemExit) as ended:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # (the handler runs between bytecodes)
                time.sleep(0.01)
        assert ended.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_peer_answering_without_outputs_fails_its_check_as_a_peer_failure():
    """The peer loop records a RuntimeError as that setting's failure and goes on; an IndexError
    ended make bench and lost every figure measured before."""
    from concurrent import futures

    import grpc

    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")  # no outputs
    service = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": handler}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((service,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(RuntimeError, match="no output"):
            compare._check_inference(f"127.0.0.1:{port}")
    finally:
        server.stop(None)


def test_a_partial_record_keeps_what_was_measured_and_names_the_failed_peers(tmp_path: Path):
    import argparse
    import json

    args = argparse.Namespace(
        quick=False, seconds=3.0, rounds=3, concurrency=[1, 16], rates=[], peers=None
    )
    results = {
        "floor": {"closed": [row(1, [0.001] * 10)], "open": [], "perf_analyzer": {}},
        "warmserve": {
            "closed": [{**row(1, [0.002] * 10), "latencies_ms": [2.0] * 10}],
            "open": [],
            "perf_analyzer": {},
        },
    }
    path = tmp_path / "compare-x.partial.json"
    failed = {"rayserve": "not ready within 300 s"}
    compare._save_partial(path, results, args, {"rayserve": {"peer": "rayserve"}}, failed)
    record = json.loads(path.read_text())
    assert record["partial"] is True and record["settings"]["concurrency"] == [1, 16]
    assert record["peers"]["failed"] == failed
    assert record["warmserve"]["closed"][0]["level"] == 1
    assert "latencies" not in json.dumps(record)  # the raw samples stay out, as in the full one


def test_open_loop_rates_scale_with_the_floors_throughput_in_the_same_run():
    floor = [
        {"level": 1, "throughput": 1014.0},
        {"level": 16, "throughput": 1858.0},
        {"level": 4, "throughput": 1845.0},
    ]
    rates, how = compare.open_loop_rates(floor)
    assert rates == [460.0, 930.0, 1500.0]  # 25/50/80 % of c=16's, two significant figures
    assert "c=16" in how and "1858/s" in how and "25/50/80 %" in how
    fast = compare.open_loop_rates([{"level": 16, "throughput": 61_234.0}])[0]
    assert fast == [15_000.0, 31_000.0, 49_000.0]  # a large host gets rates that load it


def test_without_a_floor_figure_the_open_loop_falls_back_to_fixed_rates():
    for floor in ([], [{"level": 16, "throughput": 0.0}]):  # not run; answered nothing
        rates, how = compare.open_loop_rates(floor)
        assert rates == compare.FALLBACK_RATES and "fixed" in how
    rates, _ = compare.open_loop_rates([])
    rates.append(1.0)  # the caller's list, not the constant
    assert compare.FALLBACK_RATES == [250.0, 500.0, 1000.0]


def test_the_first_servers_closed_loop_sets_the_open_loop_rates_every_server_then_gets(
    monkeypatch,
):
    """run_servers: the floor's closed-loop figure of this run sets the rates (the peers,
    measured later, get the same ones); rates given with --rates are kept."""
    import argparse

    measured: list[tuple[str, str, float]] = []
    throughput = {"floor-url": 2000.0, "warm-url": 1900.0, "peer-url": 800.0}

    def fake_measure(url, pid, *, concurrency=0, rate=0, seconds, streaming=False):
        measured.append((url, "open" if rate else "closed", rate or concurrency))
        return {
            "mode": "open" if rate else "closed",
            "level": rate or concurrency,
            "throughput": rate or throughput[url],
            **dict.fromkeys(("p50_ms", "p95_ms", "p99_ms", "max_ms"), 1.0),
            "server_cpu_us_per_call": 500.0,
            "errors": 0,
            "count": 100,
        }

    monkeypatch.setattr(compare, "_measure", fake_measure)
    monkeypatch.setattr(compare.loadgen, "run", lambda *a, **k: None)  # (the warm-up)
    args = argparse.Namespace(quick=True, seconds=1.0, concurrency=[1, 16], rounds=1, rates=None)
    compare.run_servers({"floor": ("floor-url", 1), "warmserve": ("warm-url", 2)}, args)
    assert args.rates == [500.0, 1000.0, 1600.0]  # 25/50/80 % of the floor's 2000/s
    compare.run_servers({"peer": ("peer-url", 3)}, args)
    for url in throughput:
        assert [r for u, mode, r in measured if u == url and mode == "open"] == args.rates
    args.peers = None
    assert "2000/s" in compare._settings(args)["open_loop_rates_from"]
    given = argparse.Namespace(quick=True, seconds=1.0, concurrency=[16], rounds=1, rates=[300.0])
    measured.clear()
    compare.run_servers({"floor": ("floor-url", 1)}, given)
    assert given.rates == [300.0] and [m for m in measured if m[1] == "open"] == [
        ("floor-url", "open", 300.0)
    ]


def test_each_round_of_the_closed_loop_runs_on_servers_started_afresh(monkeypatch, capsys):
    """run_servers with a restart: round 0 on the servers given, every later round on the ones
    the restart returns, each life warmed up before it is measured; the open loop on the last."""
    import argparse

    measured: list[tuple[str, str]] = []  # (url, what)
    warmed: list[str] = []
    monkeypatch.setattr(compare.loadgen, "run", lambda url, *a, **k: warmed.append(url))

    def measure(url: str, pid: int, *, concurrency: int = 0, rate: float = 0, **_: object) -> dict:
        measured.append((url, f"c={concurrency}" if concurrency else f"rate={rate:g}"))
        level = concurrency or rate
        return {
            "mode": "closed" if concurrency else "open", "level": level, "count": 10,
            "errors": 0, "seconds": 1.0, "throughput": 1.0, "p50_ms": 1.0, "p95_ms": 1.0,
            "p99_ms": 1.0, "max_ms": 1.0, "server_cpu_us_per_call": 1.0,
        }  # fmt: skip

    monkeypatch.setattr(compare, "_measure", measure)
    lives = iter(range(1, 10))

    def restart() -> dict[str, tuple[str, int]]:
        life = next(lives)
        return {"floor": (f"floor@{life}", life), "warmserve": (f"ws@{life}", life)}

    args = argparse.Namespace(concurrency=[1], rounds=3, seconds=0.1, rates=[50.0], quick=True)
    first = {"floor": ("floor@0", 0), "warmserve": ("ws@0", 0)}
    out = compare.run_servers(first, args, restart)
    closed = [url for url, what in measured if what == "c=1"]
    assert closed == ["floor@0", "ws@0", "ws@1", "floor@1", "floor@2", "ws@2"]
    assert warmed == ["floor@0", "ws@0", "floor@1", "ws@1", "floor@2", "ws@2"]
    assert [url for url, what in measured if what == "rate=50"] == ["floor@2", "ws@2"]
    assert out["warmserve"]["closed"][0]["rounds"]["p50_ms"] == [1.0, 1.0, 1.0]
    # without a restart, the same servers for every round, warmed once
    measured.clear()
    warmed.clear()
    compare.run_servers(first, args)
    assert {url for url, what in measured} == {"floor@0", "ws@0"}
    assert warmed == ["floor@0", "ws@0"]
