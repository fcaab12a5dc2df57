"""``python -m serve.testing.demo DIR``: build the demo model repository into DIR.

Run as a subprocess by ``warmserve serve`` so that the serving process never imports torch.
The folder is written to a temporary sibling and renamed into place, so a crash midway never
leaves a half-built repository behind.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from serve.testing.models import build_demo_repository


def build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        build_demo_repository(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m serve.testing.demo DIR")
    build(Path(sys.argv[1]))
    print(f"demo models written to {sys.argv[1]}")
