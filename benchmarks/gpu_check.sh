#!/usr/bin/env bash
# A short device check (about 4 minutes): the GPU tests, then ResNet-50 through one worker
# with 1 and 2 batches in flight, 1 and 4 gRPC processes, c=1 and c=64. Run through the device
# tool with carry=["serve/frontend/pb", "benchmarks/.wheels"]; results under $OUT.
set -u; OUT=${OUT:-/tmp/o}; mkdir -p $OUT; export PYTHONUNBUFFERED=1
[ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site benchmarks/.wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:$PATH"
timeout 45 python3 -m pytest -q -p no:cacheprovider --basetemp=/tmp/gt tests/gpu 2>&1 | tee $OUT/gpu_tests.txt | tail -4
find /tmp/gt -name '*.log' -print0 | tar czf $OUT/gpu_test_logs.tgz --null -T - 2>/dev/null
for s in 1 2; do mkdir -p $OUT/slots$s; L=$([ $s = 1 ] && echo "1,4" || echo 4)
timeout ${T:-100} python3 -m benchmarks.gpu_bench --out $OUT/slots$s --frontends-only --frontends $L --levels ${LV:-1,64} --workers 1 --slots $s ${X:-} 2>&1 | tee $OUT/slots$s/gpu_bench.txt | grep -v "floor batch"
(cd $OUT && tar czf slots$s.tgz slots$s && rm -rf slots$s); done; ls $OUT
