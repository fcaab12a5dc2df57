#!/usr/bin/env bash
# Download the wheels the lent GPU machine lacks (MEASURED.md: it has torch, grpcio, protobuf,
# uvloop, onnxruntime, numpy, pytest; Python 3.12) into benchmarks/.wheels (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${GPU_PYTHON_VERSION:-3.12}
DEST=benchmarks/.wheels
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" msgspec==0.22.0 python-rapidjson==1.25 prometheus-client==0.26.0 \
    grpcio-health-checking==1.80.0 tritonclient==2.73.0 safetensors==0.8.0 pytest-timeout==2.4.0 \
    py-spy==0.4.3  # the front end's profile on the GPU host (gpu_bench --profile-at)
ls -la "$DEST"
