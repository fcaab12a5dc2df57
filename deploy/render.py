"""Render a kustomization: ``kubectl kustomize DIR``, or a small Python fallback without kubectl.

    python deploy/render.py deploy/k8s/overlays/example            # kubectl when on PATH
    python deploy/render.py --python deploy/k8s/overlays/example   # the fallback, always

The fallback knows only what this repository's kustomizations use — ``resources`` (files and
folders), ``namespace``, ``images``, ``replicas`` and JSON 6902 ``patches`` with a ``target`` —
and refuses anything else rather than render it wrongly. tests/unit/test_deploy.py checks that
it renders the same objects as kubectl wherever both exist. Needs PyYAML.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "replicas", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"}
Obj = dict[str, Any]


class RenderError(Exception):
    pass


def render_with_kubectl(directory: Path, kubectl: str = "kubectl") -> str:
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory} failed: {done.stderr.strip()}")
    return done.stdout


def render_with_python(directory: Path) -> list[Obj]:
    path = next((directory / n for n in KUSTOMIZATION_FILES if (directory / n).is_file()), None)
    if path is None:
        raise RenderError(f"{directory} has no kustomization.yaml")
    kustomization = yaml.safe_load(path.read_text()) or {}
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise RenderError(f"{path}: the fallback renderer does not support {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        source = directory / entry
        if source.is_dir():
            objects += render_with_python(source)
        else:
            objects += [doc for doc in yaml.safe_load_all(source.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        _apply_patch(objects, patch, path)
    for obj in objects:
        if "namespace" in kustomization and obj["kind"] not in CLUSTER_SCOPED:
            obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for container in _containers(objects):
            if _image_name(container.get("image", "")) == image["name"]:
                container["image"] = _new_image(container["image"], image)
    for replicas in kustomization.get("replicas", []):
        for obj in objects:
            if (
                obj["kind"] in ("Deployment", "StatefulSet", "ReplicaSet")
                and _name(obj) == (replicas["name"])
            ):
                obj["spec"]["replicas"] = replicas["count"]
    return objects


def _name(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def _containers(objects: list[Obj]) -> list[Obj]:
    found = []
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        found += pod.get("initContainers", []) + pod.get("containers", [])
    return found


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


def _new_image(image: str, spec: Obj) -> str:
    name = spec.get("newName", _image_name(image))
    if "digest" in spec:
        return f"{name}@{spec['digest']}"
    tag = spec.get("newTag")
    if tag is None:
        rest = image[len(_image_name(image)) :]
        return name + rest
    return f"{name}:{tag}"


def _matches(obj: Obj, target: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"], "name": _name(obj)}
    return all(target[key] == value for key, value in wanted.items() if key in target)


def _apply_patch(objects: list[Obj], patch: Obj, source: Path) -> None:
    if set(patch) != {"target", "patch"}:
        raise RenderError(f"{source}: the fallback renderer supports only inline patches + target")
    operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise RenderError(f"{source}: only JSON 6902 patches (a list of operations) are supported")
    targets = [obj for obj in objects if _matches(obj, patch["target"])]
    if not targets:
        raise RenderError(f"{source}: patch target {patch['target']} matches nothing")
    for obj in targets:
        for operation in operations:
            _apply_operation(obj, operation)


def _apply_operation(obj: Obj, operation: Obj) -> None:
    op, path = operation["op"], operation["path"]
    keys = [k.replace("~1", "/").replace("~0", "~") for k in path.split("/")[1:]]
    parent: Any = obj
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            parent[index] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[index]
        else:
            raise RenderError(f"JSON patch op {op!r} is not supported")
    elif op in ("add", "replace"):
        if op == "replace" and last not in parent:
            raise RenderError(f"replace {path}: no such field")
        parent[last] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del parent[last]
    else:
        raise RenderError(f"JSON patch op {op!r} is not supported")


def render(directory: Path, *, force_python: bool = False) -> list[Obj]:
    """The rendered objects: kubectl's when it is on PATH (and not ``force_python``)."""
    kubectl = None if force_python else shutil.which("kubectl")
    if kubectl is not None:
        return [doc for doc in yaml.safe_load_all(render_with_kubectl(directory, kubectl)) if doc]
    return render_with_python(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--python", action="store_true", help="use the fallback, not kubectl")
    args = parser.parse_args(argv)
    try:
        objects = render(args.directory, force_python=args.python)
    except RenderError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump_all(objects, sort_keys=True), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
