"""Where and from what a benchmark record was measured: the code's git commit (and whether the
working tree differed from it), for the JSON records of make bench and perf_analyzer_run."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_state(root: Path = ROOT) -> dict[str, str | bool]:
    """{"commit": full hash, "dirty": uncommitted changes to tracked files}; "unknown" and
    False outside a git checkout."""

    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
        )
        return run.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": False}
    return {"commit": commit, "dirty": dirty}
