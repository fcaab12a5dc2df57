"""Typed FP32 image-sized requests (fp32_contents, 150,528 values) at c=8 against the identity
model: the serving process's busiest thread per call, calls/s and p50, base tree vs new tree,
servers started afresh each round, alternated."""

import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import loadgen, proctree
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.testing.models import build_identity_onnx
from tests.integration.harness import ServerProcess, wait_until

N = 224 * 224 * 3


def payload(typed: bool) -> bytes:
    r = pb.ModelInferRequest(model_name="identity")
    t = r.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, N])
    x = np.random.default_rng(0).random(N).astype(np.float32)
    if typed:
        t.contents.fp32_contents.extend(x.tolist())
    else:
        r.raw_input_contents.append(x.tobytes())
    return r.SerializeToString()


def main():
    rounds, conc = int(sys.argv[1]), int(sys.argv[2])
    trees = {"base": Path("/tmp/w27/base"), "new": Path("/work/main")}
    data = payload(True)
    res = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_identity_onnx(repo / "identity", types=("FP32",))
        for i in range(rounds):
            order = list(trees.items()) if i % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                s = ServerProcess(
                    Path(tmp) / f"{name}{i}.log", repo, env={"PYTHONPATH": str(tree)}, cwd=tree
                )
                try:
                    wait_until(s.ready_over_http, 300, "ready")
                    load = dict(concurrency=conc, payload=data, processes=2, connections=4)
                    loadgen.run(s.url, "identity", seconds=1.0, **load)
                    pid = s.process.pid
                    th0 = proctree.thread_cpu_seconds(pid)
                    r = loadgen.run(s.url, "identity", seconds=4.0, **load)
                    th1 = proctree.thread_cpu_seconds(pid)
                    m = r.summary()
                    busiest = max(v - th0.get(k, 0.0) for k, v in th1.items())
                    res[name].append(
                        (
                            m["throughput"],
                            m["p50_ms"],
                            busiest / max(1, m["count"]) * 1e6,
                            m["errors"],
                        )
                    )
                finally:
                    s.stop()
            print(i, {k: tuple(round(x, 2) for x in v[-1]) for k, v in res.items()}, flush=True)
    for k, v in res.items():
        print(
            f"{k}: calls/s {statistics.median(x[0] for x in v):.0f}, "
            f"p50 {statistics.median(x[1] for x in v):.2f} ms, "
            f"serving process's busiest thread {statistics.median(x[2] for x in v):.0f} us/call, "
            f"errors {sum(x[3] for x in v)}"
        )


if __name__ == "__main__":
    main()
