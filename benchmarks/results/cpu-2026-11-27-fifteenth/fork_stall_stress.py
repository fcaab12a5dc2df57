"""Evidence (fifteenth session): model loads under traffic, looking for a call that stalls.

    PYTHONPATH=. .venv/bin/python benchmarks/results/cpu-2026-11-27-fifteenth/\
        fork_stall_stress.py DIR LOADS [THREADS]

Serves bundle mlp version 1 with --model-control, runs THREADS closed-loop callers (5 s client
deadline) and asks LOADS times to load version 2, which fails on purpose after its worker
template has been forked. Stops at the first failed call. Before gRPC's fork handlers were
turned off, 1 call in ~1,700 loads stalled until its deadline, begun at a template's fork.
"""

import contextlib
import sys
from pathlib import Path

import tritonclient.grpc as triton

from tests.integration.harness import CallerThreads, ServerProcess
from tests.integration.test_bundles import _input, mlp_bundle


class T(CallerThreads):
    def call(self, client, seed, n):
        _, inputs = _input(1, seed * 100000 + n)
        client.infer("mlp", inputs, client_timeout=5)


def main():
    tmp = Path(sys.argv[1])
    loads = int(sys.argv[2])
    repo = tmp / "repo"
    mlp_bundle(tmp, repo, "1", 0.0)
    mlp_bundle(tmp, repo, "2", code="raise ImportError('broken on purpose')\n")
    env = {"WARMSERVE_KEEP_PREVIOUS_S": "300", "WARMSERVE_ROLLOUT_WATCH_S": "2"}
    server = ServerProcess(tmp / "server.log", repo, args=("--model-control",), env=env)
    try:
        server.wait_ready()
        c = triton.InferenceServerClient(server.url)
        with T(
            server.url, int(sys.argv[3]) if len(sys.argv) > 3 else 4, max_calls=10**7
        ) as traffic:
            traffic.wait_for(100)
            for i in range(loads):
                with contextlib.suppress(triton.InferenceServerException):
                    c.load_model("mlp")  # refused: version 2 is broken on purpose
                if traffic.errors:
                    print("load", i, "errors", traffic.errors, flush=True)
                    break
        print("calls", traffic.done, "errors", traffic.errors)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
