"""Triton's model configuration as warmserve answers it (what perf_analyzer and KServe read)."""

from __future__ import annotations

import msgspec
import pytest

from serve.frontend import metadata
from serve.frontend.pb import model_config_pb2 as mc
from tests.unit.test_controller import _model


@pytest.mark.parametrize(
    ("configured", "running", "kind", "gpus"),
    [
        ("auto", "cuda:0", mc.ModelInstanceGroup.KIND_GPU, [0]),  # auto found a GPU
        ("auto", "cpu", mc.ModelInstanceGroup.KIND_CPU, []),  # auto found none
        ("auto", "", mc.ModelInstanceGroup.KIND_CPU, []),  # no warm worker yet: as configured
        ("cuda:1", "", mc.ModelInstanceGroup.KIND_GPU, [1]),
        ("cpu", "cpu", mc.ModelInstanceGroup.KIND_CPU, []),
    ],
)
def test_the_instance_group_says_where_the_workers_run(configured, running, kind, gpus):
    model = msgspec.structs.replace(_model(workers=2), device=configured)
    (group,) = metadata.model_config(model, running).config.instance_group
    assert (group.kind, list(group.gpus), group.count) == (kind, gpus, 2)
