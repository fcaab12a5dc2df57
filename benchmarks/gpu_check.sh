#!/usr/bin/env bash
# A short device check (about 5 minutes): what waking an idle process costs on the host
# (benchmarks/wakeup.py), the GPU tests, then ResNet-50 through 4 relays and one
# worker with one batch in flight, at c=1 and c=64, three times on the same machine:
#   base     input arenas page-locked, tensors through the relays' rings (the defaults)
#   noring   WARMSERVE_RELAY_RING_SLOTS=0: tensors inline on the relay socket
#   nolock   WARMSERVE_PAGE_LOCK=0: copies to the GPU staged
#   nospin   pool.idle_spin_us = 0: workers sleep as soon as a batch is done (the default on
#            CUDA devices busy-polls 2 ms for the next one)
#   loopspin WARMSERVE_LOOP_SPIN=1: the serving loop polls while 1-2 batches are out (an
#            experiment; with 4 relays here, so compare with base; LV=1 for c=1 alone)
# and then (stream) one process and 4 relays at c=64 with streaming clients (ModelStreamInfer).
# RUNS picks and orders them (default "base noring nolock stream"); timeout_s=400 covers all
# on a fast host. Each run gets T seconds (default 110: on a slow host, building the model,
# its floors and the server's start take about 45 s before the first call).
# Run it through the device tool with carry=["serve/frontend/pb", "benchmarks/.wheels"];
# results under $OUT. Locally, on CPU:
#   SKIP_WHEELS=1 X="--smoke --device cpu" LV=1,4 OUT=/tmp/o PATH=.venv/bin:$PATH \
#   bash benchmarks/gpu_check.sh
set -u; OUT=${OUT:-/tmp/o}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
[ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site benchmarks/.wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH"
{ nproc; nvidia-smi --query-gpu=name --format=csv,noheader; timeout 30 python3 -m \
    benchmarks.wakeup; } 2>&1 | tee "$OUT/wakeup.txt"  # what waking an idle process costs here
timeout 90 python3 -m pytest -q -p no:cacheprovider --basetemp=/tmp/gt tests/gpu 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -4
find /tmp/gt -name '*.log' -print0 | tar czf "$OUT/gpu_test_logs.tgz" --null -T - 2>/dev/null
lv=${LV:-1,64}
for run in ${RUNS:-base noring nolock stream}; do
    shape=(--frontends 4 --levels "$lv")
    case $run in
        base) env=() ;;
        nospin) env=(); shape+=(--idle-spin-us 0) ;;
        loopspin) env=(WARMSERVE_LOOP_SPIN=1) ;;
        noring) env=(WARMSERVE_RELAY_RING_SLOTS=0) ;;
        nolock) env=(WARMSERVE_PAGE_LOCK=0) ;;
        stream) env=(); shape=(--frontends 1,4 --levels "${lv##*,}" --frontends-streaming) ;;
        *) echo "unknown run $run"; continue ;;
    esac
    mkdir -p "$OUT/$run"
    echo "== $run ${env[*]:-} ${shape[*]}"
    env "${env[@]}" timeout "${T:-110}" python3 -m benchmarks.gpu_bench --out "$OUT/$run" \
        --frontends-only "${shape[@]}" --workers 1 --slots 1 ${X:-} 2>&1 \
        | tee "$OUT/$run/gpu_bench.txt" | grep -v "floor batch"
    (cd "$OUT" && tar czf "$run.tgz" "$run" && rm -rf "$run")
done
ls "$OUT"
