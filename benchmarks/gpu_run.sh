#!/usr/bin/env bash
# The one prepared script for the lent GPU machine (see the device tool's README).
#
# Here, first:   bash benchmarks/gpu_wheels.sh      (wheels the GPU machine lacks, for its Python)
#                make protos                        (generated stubs; they are git-ignored)
# Then through the device tool:
#   run(command="bash benchmarks/gpu_run.sh", carry=["serve/frontend/pb", "benchmarks/.wheels"],
#       timeout_s=540)
# It installs the carried wheels (no dependencies: torch, grpcio, protobuf, numpy, uvloop and
# onnxruntime are already there) into /tmp/site, runs the GPU benchmark and then the GPU tests,
# and leaves everything in $OUT (at most 8 files) for benchmarks/RESULTS.md. Each step has its
# own timeout, so the whole script ends inside 8 minutes.
# GPU_SECOND_ARGS, if set, are the arguments of a second, shorter gpu_bench run after the tests
# (e.g. "--frontends-only --frontends 1,2,4 --levels 32,64 --workers 1 --slots 1"). It gets
# what is left of SCRIPT_LIMIT_S (default 570 s) and comes back as $OUT/second.tgz.
set -uo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Locally, to check this script on CPU:  SKIP_WHEELS=1 GPU_BENCH_ARGS="--smoke --device cpu" \
#   PATH=.venv/bin:$PATH bash benchmarks/gpu_run.sh
[ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site benchmarks/.wheels/*.whl 2>&1 | grep -v "WARNING: Running pip as" | tail -3
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH"  # carried py-spy lands in bin/
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc; python3 -c "import torch, grpc, google.protobuf as p, sys; print('torch', \
torch.__version__, 'cuda', torch.version.cuda, 'grpcio', grpc.__version__, 'protobuf', \
p.__version__, sys.version.split()[0])"; } > "$OUT/machine.txt" 2>&1
timeout 30 python3 -m benchmarks.wakeup >> "$OUT/machine.txt" 2>&1  # idle wake-up cost
cat "$OUT/machine.txt"
echo "== GPU benchmark"
timeout 400 python3 -m benchmarks.gpu_bench --out "$OUT" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.txt"
echo "== GPU tests"
timeout 60 python3 -m pytest -q -p no:cacheprovider --basetemp=/tmp/gpu-tests tests/gpu 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -25
find /tmp/gpu-tests -name '*.log' -print0 2>/dev/null \
    | tar czf "$OUT/gpu_test_logs.tgz" --null -T - 2>/dev/null
if [ -n "${GPU_SECOND_ARGS:-}" ]; then
    left=$(( ${SCRIPT_LIMIT_S:-570} - SECONDS ))
    echo "== second run, ${left} s left: gpu_bench ${GPU_SECOND_ARGS}"
    if [ "$left" -gt 30 ]; then
        mkdir -p "$OUT/second"
        timeout "$left" python3 -m benchmarks.gpu_bench --out "$OUT/second" ${GPU_SECOND_ARGS} 2>&1 \
            | tee "$OUT/second/gpu_bench.txt"
        (cd "$OUT" && tar czf second.tgz second && rm -rf second)
    fi
fi
(cd "$OUT" && tar czf server_logs.tgz ./*.log && rm -f ./*.log)  # files back: at most 8
ls -la "$OUT"
