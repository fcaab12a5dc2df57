#!/usr/bin/env bash
# A short device check (about 4 minutes): the GPU tests, then ResNet-50 through one worker with
# one batch in flight, 1 and 4 gRPC processes, c=1 and c=64, with the workers' input arenas
# page-locked and then not (WARMSERVE_PAGE_LOCK=0), on the same machine. Run it through the
# device tool with carry=["serve/frontend/pb", "benchmarks/.wheels"]; results under $OUT.
# Locally, on CPU:  SKIP_WHEELS=1 X="--smoke --device cpu" LV=1,4 OUT=/tmp/o \
#   PATH=.venv/bin:$PATH bash benchmarks/gpu_check.sh
set -u; OUT=${OUT:-/tmp/o}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
[ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site benchmarks/.wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH"
timeout 45 python3 -m pytest -q -p no:cacheprovider --basetemp=/tmp/gt tests/gpu 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -4
find /tmp/gt -name '*.log' -print0 | tar czf "$OUT/gpu_test_logs.tgz" --null -T - 2>/dev/null
for lock in 1 0; do
    mkdir -p "$OUT/lock$lock"
    WARMSERVE_PAGE_LOCK=$lock timeout "${T:-100}" python3 -m benchmarks.gpu_bench \
        --out "$OUT/lock$lock" --frontends-only --frontends 1,4 --levels "${LV:-1,64}" \
        --workers 1 --slots 1 ${X:-} 2>&1 | tee "$OUT/lock$lock/gpu_bench.txt" | grep -v "floor batch"
    (cd "$OUT" && tar czf "lock$lock.tgz" "lock$lock" && rm -rf "lock$lock")
done
ls "$OUT"
