#!/usr/bin/env bash
# The one prepared script for the lent GPU machine (see the device tool's README).
#
# Here, first:   bash benchmarks/gpu_wheels.sh      (wheels the GPU machine lacks, for its Python)
#                make protos                        (generated stubs; they are git-ignored)
# Then through the device tool:
#   run(command="bash benchmarks/gpu_run.sh", carry=["serve/frontend/pb", "benchmarks/.wheels"],
#       timeout_s=540)
# It installs the carried wheels (no dependencies: torch, grpcio, protobuf, numpy, uvloop and
# onnxruntime are already there), runs the GPU tests and the GPU benchmark, and leaves
# everything in $OUT for benchmarks/RESULTS.md. Bounded: each step has its own timeout.
set -uo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD"
python3 -m pip install --quiet --no-deps benchmarks/.wheels/*.whl 2>&1 | tail -3
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c \
    "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, sys.version)"; } \
    > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
timeout 300 python3 -m benchmarks.gpu_bench --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.txt" | tail -40
