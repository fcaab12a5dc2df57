"""gRPC's fork handlers are off in the serving process (serve/frontend/grpc_process.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Runs in a fresh interpreter (this one imported grpc long ago): prepare(), then what gRPC sees.
SCRIPT = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
if sys.argv[1] == "grpc-first":
    import grpc
from serve.frontend import grpc_process
print("prepared", grpc_process.prepare(), os.environ["GRPC_ENABLE_FORK_SUPPORT"], flush=True)
"""


def _run(mode: str, fork_support: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    if fork_support is not None:
        env["GRPC_ENABLE_FORK_SUPPORT"] = fork_support
    command = [sys.executable, "-c", SCRIPT, mode]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("given", [None, "0", "false"])
def test_fork_support_is_turned_off_quietly_when_unset_or_off(given):
    run = _run("plain", given)
    assert run.returncode == 0, run.stderr
    assert "prepared True false" in run.stdout
    assert "GRPC_ENABLE_FORK_SUPPORT" not in run.stderr


def test_fork_support_asked_for_is_overridden_with_a_log_line():
    run = _run("plain", "1")
    assert "prepared True false" in run.stdout
    assert "GRPC_ENABLE_FORK_SUPPORT=1 ignored" in run.stderr


def test_prepare_after_grpc_was_imported_says_it_came_too_late():
    run = _run("grpc-first", None)
    assert "prepared False false" in run.stdout
    assert "gRPC was imported before its fork handlers could be turned off" in run.stderr


def test_the_cli_prepares_before_anything_imports_grpc():
    # The serving path of the CLI imports grpc only after prepare(): nothing it imports at
    # module level may pull gRPC in first (else the setting silently comes too late).
    imports = "import sys, serve.cli, serve.config, serve.frontend.grpc_logs"
    code = f"{imports}; print('grpc' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "False", run.stderr
