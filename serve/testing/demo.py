"""``python -m serve.testing.demo DIR``: build the demo model repository (bundles) into DIR.

Run as a subprocess by ``warmserve serve`` so that the serving process never imports torch.
The folder is written to a temporary sibling and renamed into place, so a crash midway never
leaves a half-built repository behind.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from serve.bundles.build import build_bundle
from serve.testing.models import build_demo_repository


def build(target: Path, as_bundles: bool = True) -> None:
    """Write the demo models to ``target``: as bundles (``NAME/VERSION/``), or as model folders."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        if as_bundles:
            with tempfile.TemporaryDirectory() as sources:
                for folder in build_demo_repository(Path(sources)):
                    name = folder.name
                    build_bundle(folder, staging / name / "1")
        else:
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
