"""The package's lower bounds admit no runtime that its own generated stubs refuse.

The stubs in serve/frontend/pb are generated at build time (make protos, the Dockerfile) by the
pinned grpcio-tools; they check at import that the grpcio and protobuf runtimes are at least the
versions they were generated with. An installation that pyproject.toml allows must import them.
The generated files are read as text: importing them here would register the inference.*
protobuf symbols that tritonclient's copies register too.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PB = ROOT / "serve" / "frontend" / "pb"


def _lower_bound(requirement: str) -> Version:
    parsed = Requirement(requirement)
    bounds = [Version(s.version) for s in parsed.specifier if s.operator in (">=", "==", "~=")]
    assert bounds, f"{requirement!r} has no lower bound"
    return max(bounds)


def _requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        listed += extra
    return {Requirement(r).name: r for r in listed}


def _generated(pattern: str) -> list[Path]:
    files = sorted(PB.glob(pattern))
    if not files:
        pytest.skip("no generated stubs (make protos)")
    return files


def test_grpcio_lower_bound_is_at_least_the_stubs_grpc_version():
    floor = _lower_bound(_requirements()["grpcio"])
    tools = _lower_bound(_requirements()["grpcio-tools"])
    for path in _generated("*_pb2_grpc.py"):
        found = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", path.read_text(), re.M)
        assert found, f"{path.name}: no GRPC_GENERATED_VERSION"
        generated = Version(found.group(1))
        assert floor >= generated, f"grpcio>={floor} admits a runtime {path.name} refuses"
        assert tools >= generated, f"grpcio-tools>={tools} is older than what made {path.name}"


def test_protobuf_lower_bound_is_at_least_the_stubs_gencode_version():
    floor = _lower_bound(_requirements()["protobuf"])
    for path in _generated("*_pb2.py"):
        found = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", path.read_text()
        )
        assert found, f"{path.name}: no ValidateProtobufRuntimeVersion"
        generated = Version(".".join(found.groups()))
        assert floor >= generated, f"protobuf>={floor} admits a runtime {path.name} refuses"


def test_the_checks_parse_what_they_compare():
    assert _lower_bound("grpcio>=1.66") == Version("1.66")
    assert _lower_bound("protobuf>=6.31.1,<8") == Version("6.31.1")
    with pytest.raises(AssertionError, match="no lower bound"):
        _lower_bound("grpcio")
