#!/usr/bin/env bash
# Install the peer servers that benchmarks/compare.py measures beside warmserve, each into its own
# virtual environment under benchmarks/.peers/<peer>/ (git-ignored), from
# benchmarks/peers/<peer>/requirements.txt. The project's .venv is never touched.
#
#   bash benchmarks/peers/setup.sh                  # every peer (mlserver, pytriton, rayserve)
#   bash benchmarks/peers/setup.sh mlserver         # just these
#   PYTHON=/path/to/python3.11 bash benchmarks/peers/setup.sh
#
# Idempotent: a venv whose stamp matches its requirements file (sha256) is left as it is; a
# changed requirements file rebuilds that venv from scratch. A peer that fails to install is
# reported and the others go on; the exit status is non-zero if any requested peer failed.
# PYTHON (default python3.11) must be a CPython 3.11 with a shared libpython (PyTriton's Triton
# Python backend stub loads libpython3.11.so); pyenv and Debian builds both are.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS_SRC="$ROOT/benchmarks/peers"
PEERS_ENV="$ROOT/benchmarks/.peers"
PYTHON="${PYTHON:-python3.11}"

declare -A CHECK=(
    [mlserver]='import mlserver, onnxruntime; print("mlserver", mlserver.__version__)'
    [pytriton]='import importlib.metadata as m, pytriton, onnxruntime; print("nvidia-pytriton", m.version("nvidia-pytriton"))'
    [rayserve]='import ray, ray.serve, onnxruntime, tritonclient.grpc.service_pb2_grpc; print("ray", ray.__version__)'
)

log() { printf 'peers/setup: %s\n' "$*" >&2; }

if [[ $# -gt 0 ]]; then
    peers=("$@")
else
    peers=()
    for req in "$PEERS_SRC"/*/requirements.txt; do
        peers+=("$(basename "$(dirname "$req")")")
    done
fi

command -v "$PYTHON" >/dev/null || { log "ERROR: $PYTHON not found (set PYTHON)"; exit 1; }
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { log "ERROR: $PYTHON is not Python 3.11"; exit 1; }

install_peer() {
    local peer="$1" req="$PEERS_SRC/$1/requirements.txt" venv="$PEERS_ENV/$1"
    [[ -f "$req" ]] || { log "$peer: no $req"; return 1; }
    local want
    want="$(sha256sum "$req" | cut -d' ' -f1)"
    if [[ -x "$venv/bin/python" && "$(cat "$venv/.requirements.sha256" 2>/dev/null)" == "$want" ]]; then
        log "$peer: up to date ($venv)"
    else
        log "$peer: creating $venv from $req"
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv" || return 1
        "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req" 2>&1 \
            | grep -v "^WARNING: Location '.*' is ignored" >&2
        [[ "${PIPESTATUS[0]}" -eq 0 ]] || { rm -rf "$venv"; return 1; }
        echo "$want" >"$venv/.requirements.sha256"
    fi
    local check="${CHECK[$peer]:-import sys}"
    "$venv/bin/python" -c "$check" || { rm -f "$venv/.requirements.sha256"; return 1; }
}

installed=()
failed=()
mkdir -p "$PEERS_ENV"
for peer in "${peers[@]}"; do
    if install_peer "$peer"; then installed+=("$peer"); else failed+=("$peer"); fi
done
log "installed: ${installed[*]:-none}"
[[ ${#failed[@]} -eq 0 ]] || { log "FAILED: ${failed[*]}"; exit 1; }
