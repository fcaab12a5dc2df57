"""Wire compatibility of protos/*.proto with Triton's grpc_service.proto / model_config.proto.

The reference is the serialized descriptors shipped in ``tritonclient.grpc`` (what the stock
client and perf_analyzer speak). Our protos are compiled to a FileDescriptorSet by protoc in a
subprocess: our generated ``serve.frontend.pb`` modules must not be imported here, since they
register the same ``inference.*`` symbols in protobuf's default descriptor pool as tritonclient.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOS_DIR = REPO_ROOT / "protos"
PROTO_FILES = ("grpc_service.proto", "model_config.proto")

FieldProto = descriptor_pb2.FieldDescriptorProto
FileProto = descriptor_pb2.FileDescriptorProto


# --------------------------------------------------------------------------- descriptor diffing


def _walk_messages(
    messages: Iterable[descriptor_pb2.DescriptorProto], prefix: str
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for msg in messages:
        full = f"{prefix}.{msg.name}"
        yield full, msg
        yield from _walk_messages(msg.nested_type, full)


def _index(files: Iterable[FileProto]) -> tuple[dict, dict, dict]:
    """Index messages, enums and services of ``files`` by fully qualified name.

    Messages map to ``(DescriptorProto, syntax)``: the file's syntax decides wire details such
    as packed encoding of repeated scalars.
    """
    messages: dict[str, tuple[descriptor_pb2.DescriptorProto, str]] = {}
    enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
    services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
    for fd in files:
        root = f".{fd.package}" if fd.package else ""
        syntax = fd.syntax or "proto2"
        for enum in fd.enum_type:
            enums[f"{root}.{enum.name}"] = enum
        for full, msg in _walk_messages(fd.message_type, root):
            messages[full] = (msg, syntax)
            for enum in msg.enum_type:
                enums[f"{full}.{enum.name}"] = enum
        for svc in fd.service:
            services[f"{root}.{svc.name}"] = svc
    return messages, enums, services


def _field_facts(msg: descriptor_pb2.DescriptorProto, field: FieldProto) -> dict[str, object]:
    oneof = msg.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    return {
        "number": field.number,
        "type": FieldProto.Type.Name(field.type),
        "label": FieldProto.Label.Name(field.label),
        "type_name": field.type_name,
        "oneof": oneof,
        "proto3_optional": field.proto3_optional,
        "options": str(field.options).strip(),
    }


def diff_descriptors(expected: Iterable[FileProto], actual: Iterable[FileProto]) -> list[str]:
    """Every protocol difference of ``actual`` from ``expected``, one line each.

    Every message (nested ones included), enum and service RPC of ``expected`` must exist in
    ``actual`` with identical facts; fields and enum values must match exactly (no extras).
    Extra messages, enums or RPCs in ``actual`` are allowed.
    """
    exp_msgs, exp_enums, exp_svcs = _index(expected)
    act_msgs, act_enums, act_svcs = _index(actual)
    diffs: list[str] = []

    for name, (exp, exp_syntax) in exp_msgs.items():
        if name not in act_msgs:
            diffs.append(f"message {name}: missing")
            continue
        act, act_syntax = act_msgs[name]
        if exp_syntax != act_syntax:
            diffs.append(f"message {name}: syntax {act_syntax!r}, expected {exp_syntax!r}")
        if exp.options.map_entry != act.options.map_entry:
            diffs.append(
                f"message {name}: map_entry={act.options.map_entry}, "
                f"expected {exp.options.map_entry}"
            )
        exp_fields = {f.name: _field_facts(exp, f) for f in exp.field}
        act_fields = {f.name: _field_facts(act, f) for f in act.field}
        for fname, facts in exp_fields.items():
            if fname not in act_fields:
                diffs.append(f"field {name}.{fname}: missing")
                continue
            for key, value in facts.items():
                if act_fields[fname][key] != value:
                    diffs.append(
                        f"field {name}.{fname}: {key}={act_fields[fname][key]!r}, "
                        f"expected {value!r}"
                    )
        for fname in act_fields.keys() - exp_fields.keys():
            diffs.append(f"field {name}.{fname}: unexpected (number {act_fields[fname]['number']})")

    for name, exp_enum in exp_enums.items():
        if name not in act_enums:
            diffs.append(f"enum {name}: missing")
            continue
        exp_values = {v.name: v.number for v in exp_enum.value}
        act_values = {v.name: v.number for v in act_enums[name].value}
        for vname, number in exp_values.items():
            if vname not in act_values:
                diffs.append(f"enum value {name}.{vname}: missing")
            elif act_values[vname] != number:
                diffs.append(
                    f"enum value {name}.{vname}: number={act_values[vname]}, expected {number}"
                )
        for vname in act_values.keys() - exp_values.keys():
            diffs.append(f"enum value {name}.{vname}: unexpected (number {act_values[vname]})")

    for name, exp_svc in exp_svcs.items():
        if name not in act_svcs:
            diffs.append(f"service {name}: missing")
            continue
        act_methods = {m.name: m for m in act_svcs[name].method}
        for method in exp_svc.method:
            rpc = f"rpc {name}.{method.name}"
            if method.name not in act_methods:
                diffs.append(f"{rpc}: missing")
                continue
            got = act_methods[method.name]
            for key in ("input_type", "output_type", "client_streaming", "server_streaming"):
                if getattr(got, key) != getattr(method, key):
                    diffs.append(
                        f"{rpc}: {key}={getattr(got, key)!r}, expected {getattr(method, key)!r}"
                    )
    return diffs


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def triton_files() -> list[FileProto]:
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    from tritonclient.grpc import model_config_pb2, service_pb2

    files = []
    for module in (model_config_pb2, service_pb2):
        fd = FileProto()
        module.DESCRIPTOR.CopyToProto(fd)
        files.append(fd)
    return files


@pytest.fixture(scope="module")
def our_files(tmp_path_factory: pytest.TempPathFactory) -> list[FileProto]:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools (grpc_tools) is not installed; cannot compile protos/*.proto")
    out = tmp_path_factory.mktemp("protos") / "set.pb"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS_DIR}",
        "--include_imports",
        f"--descriptor_set_out={out}",
        *(str(PROTOS_DIR / name) for name in PROTO_FILES),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, f"protoc failed:\n{proc.stdout}{proc.stderr}"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return list(fds.file)


# --------------------------------------------------------------------------- tests


def test_protos_are_wire_compatible_with_triton(
    triton_files: list[FileProto], our_files: list[FileProto]
) -> None:
    diffs = diff_descriptors(triton_files, our_files)
    assert not diffs, f"{len(diffs)} protocol difference(s) from Triton:\n" + "\n".join(diffs)


def test_our_files_declare_package_and_syntax(our_files: list[FileProto]) -> None:
    by_name = {fd.name: fd for fd in our_files}
    assert set(PROTO_FILES) <= by_name.keys()
    for name in PROTO_FILES:
        assert by_name[name].package == "inference"
        assert by_name[name].syntax == "proto3"
    services = [s.name for s in by_name["grpc_service.proto"].service]
    assert services == ["GRPCInferenceService"]


def test_reference_is_not_empty(triton_files: list[FileProto]) -> None:
    # Guards against a vacuous pass if tritonclient ever ships empty descriptors.
    messages, enums, services = _index(triton_files)
    assert len(messages) > 50 and enums and services
    svc = services[".inference.GRPCInferenceService"]
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig"} <= {m.name for m in svc.method}


def test_diff_is_empty_for_identical_descriptors(triton_files: list[FileProto]) -> None:
    assert diff_descriptors(triton_files, copy.deepcopy(triton_files)) == []


def _find(files: list[FileProto], file_name: str) -> FileProto:
    return next(fd for fd in files if fd.name == file_name)


def _msg(fd: FileProto, *path: str) -> descriptor_pb2.DescriptorProto:
    msgs = fd.message_type
    found = None
    for part in path:
        found = next(m for m in msgs if m.name == part)
        msgs = found.nested_type
    assert found is not None
    return found


def _field(msg: descriptor_pb2.DescriptorProto, name: str) -> FieldProto:
    return next(f for f in msg.field if f.name == name)


def test_diff_detects_alterations(triton_files: list[FileProto]) -> None:
    altered = copy.deepcopy(triton_files)
    svc_file = _find(altered, "grpc_service.proto")
    cfg_file = _find(altered, "model_config.proto")

    # field number, nested message field type, label, map value type
    _field(_msg(svc_file, "ModelInferRequest"), "id").number = 99
    _field(
        _msg(svc_file, "ModelInferRequest", "InferInputTensor"), "shape"
    ).type = FieldProto.TYPE_INT32
    _field(_msg(svc_file, "ServerMetadataResponse"), "extensions").label = FieldProto.LABEL_OPTIONAL
    entry = _msg(svc_file, "ModelInferRequest", "ParametersEntry")
    _field(entry, "value").type_name = ".inference.ModelRepositoryParameter"
    entry.options.map_entry = False
    # oneof membership
    _field(_msg(svc_file, "InferParameter"), "bool_param").ClearField("oneof_index")
    # enum value number, removed RPC, streaming flag
    data_type = next(e for e in cfg_file.enum_type if e.name == "DataType")
    next(v for v in data_type.value if v.name == "TYPE_FP32").number = 42
    methods = svc_file.service[0].method
    methods.remove(next(m for m in methods if m.name == "LogSettings"))
    next(m for m in methods if m.name == "ModelStreamInfer").server_streaming = False
    # removed message
    cfg_file.message_type.remove(_msg(cfg_file, "ModelResponseCache"))

    diffs = diff_descriptors(triton_files, altered)
    text = "\n".join(diffs)
    expected_mentions = [
        "field .inference.ModelInferRequest.id: number=99",
        "field .inference.ModelInferRequest.InferInputTensor.shape: type='TYPE_INT32'",
        "field .inference.ServerMetadataResponse.extensions: label='LABEL_OPTIONAL'",
        "field .inference.ModelInferRequest.ParametersEntry.value: type_name=",
        "message .inference.ModelInferRequest.ParametersEntry: map_entry=False",
        "field .inference.InferParameter.bool_param: oneof=None",
        "enum value .inference.DataType.TYPE_FP32: number=42, expected 11",
        "rpc .inference.GRPCInferenceService.LogSettings: missing",
        "rpc .inference.GRPCInferenceService.ModelStreamInfer: server_streaming=False",
        "message .inference.ModelResponseCache: missing",
    ]
    for mention in expected_mentions:
        assert mention in text, f"diff did not report {mention!r}; got:\n{text}"

    # extra fields in ours are reported too
    extra = copy.deepcopy(triton_files)
    _msg(_find(extra, "grpc_service.proto"), "ServerLiveResponse").field.add(
        name="uptime", number=2, type=FieldProto.TYPE_UINT64, label=FieldProto.LABEL_OPTIONAL
    )
    assert diff_descriptors(triton_files, extra) == [
        "field .inference.ServerLiveResponse.uptime: unexpected (number 2)"
    ]
