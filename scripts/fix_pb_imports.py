"""Make protoc's generated Python modules import each other relatively.

``grpc_tools.protoc -Iprotos --python_out=DIR ...`` writes modules that import their sibling
modules as top-level modules (``import model_config_pb2 as model__config__pb2``), which only
works when DIR itself is on ``sys.path``. This script rewrites those imports in DIR's
``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` files into package-relative imports
(``from . import model_config_pb2 as model__config__pb2``) so that DIR works as a package
(``serve.frontend.pb``). Only imports of modules generated into DIR are touched; the rewrite is
idempotent.

Usage: python scripts/fix_pb_imports.py DIR
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    )


def local_modules(directory: Path) -> set[str]:
    """Names of the generated modules in ``directory`` (``model_config_pb2``, ...)."""
    return {p.name.split(".", 1)[0] for p in generated_files(directory) if p.suffix == ".py"}


def fix_source(text: str, modules: set[str]) -> str:
    """Rewrite top-level imports of ``modules`` in ``text`` into relative imports."""
    if not modules:
        return text
    names = "|".join(re.escape(m) for m in sorted(modules, key=len, reverse=True))
    # import foo_pb2 as alias   ->  from . import foo_pb2 as alias
    text = re.sub(
        rf"^import ({names})( as \w+)?[ \t]*$",
        lambda m: f"from . import {m.group(1)}{m.group(2) or ''}",
        text,
        flags=re.MULTILINE,
    )
    # from foo_pb2 import X     ->  from .foo_pb2 import X
    return re.sub(rf"^from ({names}) import ", r"from .\1 import ", text, flags=re.MULTILINE)


def fix_directory(directory: Path) -> list[Path]:
    """Fix every generated file in ``directory``; return the files that changed."""
    modules = local_modules(directory)
    changed = []
    for path in generated_files(directory):
        old = path.read_text(encoding="utf-8")
        new = fix_source(old, modules)
        if new != old:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DIR", file=sys.stderr)
        return 2
    directory = Path(argv[1])
    if not directory.is_dir():
        print(f"{argv[0]}: not a directory: {directory}", file=sys.stderr)
        return 2
    for path in fix_directory(directory):
        print(f"fixed imports in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
