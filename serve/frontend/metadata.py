"""Protobuf views of the runtime's state: metadata, model configuration, statistics, index."""

from __future__ import annotations

from typing import Any

from serve import __version__
from serve.config import ModelConfig, TensorSpec
from serve.frontend.pb import grpc_service_pb2 as pb
from serve.frontend.pb import model_config_pb2 as mc
from serve.model_service import ModelService, ModelStatus
from serve.telemetry.stats import Duration, ModelStats

SERVER_NAME = "warmserve"
EXTENSIONS = ("model_configuration", "statistics", "model_repository")
PLATFORMS = {"onnx": "onnxruntime_onnx", "torch": "pytorch_libtorch"}
BACKENDS = {"onnx": "onnxruntime", "torch": "pytorch"}


def server_metadata() -> Any:
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


def _dims(spec: TensorSpec, model: ModelConfig) -> list[int]:
    return ([-1] if model.max_batch_size > 0 else []) + list(spec.shape)


def model_metadata(model: ModelConfig, versions: list[str]) -> Any:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=versions,
        platform=PLATFORMS[model.backend],
        inputs=[
            tensor(name=s.name, datatype=s.datatype, shape=_dims(s, model)) for s in model.inputs
        ],
        outputs=[
            tensor(name=s.name, datatype=s.datatype, shape=_dims(s, model)) for s in model.outputs
        ],
    )


def _data_type(datatype: str) -> str:
    """Triton's DataType enum name for a protocol datatype (BYTES is TYPE_STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(model: ModelConfig, device: str = "") -> Any:
    """Triton's model configuration (what perf_analyzer needs to drive the model). ``device``:
    where the model runs (its workers' report), when known; else its configured device."""
    device = device or model.device
    gpu = device.startswith("cuda")
    group = mc.ModelInstanceGroup(
        name=model.name,
        count=model.pool.workers,
        kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
        gpus=[int(device.partition(":")[2] or 0)] if gpu else [],
    )
    config = mc.ModelConfig(
        name=model.name,
        platform=PLATFORMS[model.backend],
        backend=BACKENDS[model.backend],
        max_batch_size=model.max_batch_size,
        input=[
            mc.ModelInput(name=s.name, data_type=_data_type(s.datatype), dims=s.shape)
            for s in model.inputs
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=_data_type(s.datatype), dims=s.shape)
            for s in model.outputs
        ],
        instance_group=[group],
        default_model_filename=model.model_file,
    )
    if model.max_batch_size > 0:
        config.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=list(model.batch_buckets),
                max_queue_delay_microseconds=model.batching.max_queue_delay_us,
            )
        )
    return pb.ModelConfigResponse(config=config)


def _duration(d: Duration) -> Any:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _model_statistics(model: ModelConfig, stats: ModelStats) -> Any:
    return pb.ModelStatistics(
        name=model.name,
        version=model.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(stats.batches.items())
        ],
    )


def model_statistics(services: list[ModelService]) -> Any:
    return pb.ModelStatisticsResponse(
        model_stats=[_model_statistics(s.config, s.stats) for s in services]
    )


def repository_index(statuses: list[ModelStatus], ready_only: bool) -> Any:
    index = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[
            index(name=s.name, version=s.version, state=s.state.value, reason=s.reason)
            for s in statuses
            if not ready_only or s.state.value == "READY"
        ]
    )
