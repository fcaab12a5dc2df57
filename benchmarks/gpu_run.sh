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
# GPU_SECOND_ARGS, if set, are the arguments of more, shorter gpu_bench runs after the tests,
# separated by ';' (e.g. "--frontends-only --frontends 1 --levels 1 --workers 1 --slots 1;
# --frontends-only ... --idle-spin-us 2000"); leading NAME=value words are the run's environment
# (e.g. "WARMSERVE_RELAY_RING_SLOTS=0 --frontends-only ..."). They share what is left of
# SCRIPT_LIMIT_S (default 570 s), run in order while time is left, and come back in
# $OUT/second.tgz (second/1, second/2, ...).
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
timeout 90 python3 -m pytest -q -p no:cacheprovider --basetemp=/tmp/gpu-tests tests/gpu 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -25
find /tmp/gpu-tests -name '*.log' -print0 2>/dev/null \
    | tar czf "$OUT/gpu_test_logs.tgz" --null -T - 2>/dev/null
if [ -n "${GPU_SECOND_ARGS:-}" ]; then
    IFS=';' read -ra second_runs <<< "$GPU_SECOND_ARGS"
    n=0
    for entry in "${second_runs[@]}"; do
        n=$((n + 1)); envs=(); args=()
        for word in $entry; do
            if [ ${#args[@]} -eq 0 ] && [[ $word == *=* && $word != -* ]]; then envs+=("$word")
            else args+=("$word"); fi
        done
        [ ${#args[@]} -gt 0 ] || continue
        left=$(( ${SCRIPT_LIMIT_S:-570} - SECONDS ))
        echo "== second run $n, ${left} s left: ${envs[*]:-} gpu_bench ${args[*]}"
        if [ "$left" -le 30 ]; then echo "   (skipped: too little time left)"; continue; fi
        mkdir -p "$OUT/second/$n"
        env "${envs[@]}" timeout "$left" python3 -m benchmarks.gpu_bench --out "$OUT/second/$n" \
            "${args[@]}" 2>&1 | tee "$OUT/second/$n/gpu_bench.txt" | grep -v "floor batch"
    done
    [ -d "$OUT/second" ] && (cd "$OUT" && tar czf second.tgz second && rm -rf second)
fi
(cd "$OUT" && tar czf server_logs.tgz ./*.log && rm -f ./*.log)  # files back: at most 8
ls -la "$OUT"
