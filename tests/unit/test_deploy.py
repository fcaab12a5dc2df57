"""The Kubernetes manifests (deploy/k8s) agree with Kubernetes and with the server.

Renders the kustomizations (``kubectl kustomize``, or deploy/render.py's Python fallback without
kubectl), validates every object strictly against the Kubernetes 1.27 schemas and the newest
ones kubernetes-validate ships, and checks what no schema can: that probes, ports, health service
names, drain and grace times in the manifests match what ``serve.config`` reads and answers.
Run by ``make test`` and ``make deploy-check``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import kubernetes_validate
import msgspec
import pytest
import yaml

from serve import __version__
from serve.app import connection_drain_s, shutdown_budget_s
from serve.config import (
    LIVENESS_SERVICE,
    READINESS_SERVICE,
    PoolConfig,
    ServerConfig,
    cache_dir_from_env,
    default_repository_from_env,
    server_config_from_env,
)
from serve.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAY = K8S / "overlays" / "example"
TARGETS = {"base": K8S / "base", "overlay": OVERLAY}
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())

# Beyond the server's own shutdown budget, before the kubelet's SIGKILL (process exit, logs).
SHUTDOWN_MARGIN_S = 5.0
# Beyond a worker's startup timeout: server start and the first probe.
STARTUP_MARGIN_S = 15.0
HEALTH_SERVICES = {LIVENESS_SERVICE, READINESS_SERVICE, ""}
# flag → ServerConfig field, for flags a manifest may pass in command/args (flags win over env)
FLAGS = {
    "--host": "host",
    "--grpc-port": "grpc_port",
    "--http-port": "http_port",
    "--health-port": "health_port",
    "--grace-period": "grace_period_s",
    "--drain-delay": "drain_delay_s",
}
TAG_PATTERN = re.compile(r"^\d+\.\d+\.\d+[0-9A-Za-z.+]*-[0-9a-f]{12}$")

Obj = dict[str, Any]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def render() -> ModuleType:
    if shutil.which("kubectl") is None and not (DEPLOY / "render.py").is_file():
        pytest.skip("neither kubectl nor deploy/render.py is available to render the manifests")
    return _load("render")


@pytest.fixture(scope="module")
def rendered(render: ModuleType) -> dict[str, list[Obj]]:
    """Both kustomizations rendered once (kubectl when on PATH, else the Python fallback)."""
    return {name: render.render(path) for name, path in TARGETS.items()}


# --- reading the manifests ----------------------------------------------------------------------


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"].get("name"))]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: Obj) -> Obj:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def named_ports(c: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}


def manifest_env(c: Obj) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}


def dockerfile_env() -> dict[str, str]:
    """WARMSERVE_* set by ENV in the Dockerfile's final stage (the container starts with them)."""
    env: dict[str, str] = {}
    for instruction in dockerfile_instructions(final_stage=True):
        if instruction.startswith("ENV "):
            for token in shlex.split(instruction[4:]):
                key, sep, value = token.partition("=")
                if sep and key.startswith("WARMSERVE_"):
                    env[key] = value
    return env


def dockerfile_instructions(final_stage: bool = False) -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    instructions = [ln.strip() for ln in joined.splitlines() if ln.strip()]
    if final_stage:
        last_from = max(i for i, ln in enumerate(instructions) if ln.startswith("FROM "))
        instructions = instructions[last_from:]
    return instructions


def flag_overrides(c: Obj) -> dict[str, str]:
    words = [*c.get("command", []), *c.get("args", [])]
    overrides = {}
    for i, word in enumerate(words):
        flag, sep, value = word.partition("=")
        if flag in FLAGS:
            overrides[FLAGS[flag]] = value if sep else words[i + 1]
    return overrides


def effective_server_config(c: Obj) -> ServerConfig:
    """What the server would run with: image ENV, then the manifest's env, then its flags."""
    env = {**dockerfile_env(), **manifest_env(c)}
    with mock.patch.dict(os.environ, env, clear=True):
        return server_config_from_env(**flag_overrides(c))


def read_by_server(variable: str) -> bool:
    """Does setting ``variable`` change anything the server reads from its environment?"""

    def snapshot() -> tuple[object, ...]:
        try:
            config: object = server_config_from_env()
        except ConfigError as exc:  # it read the value (and refused it)
            config = str(exc)
        return config, cache_dir_from_env(), default_repository_from_env()

    with mock.patch.dict(os.environ, {}, clear=True):
        before = snapshot()
    with mock.patch.dict(os.environ, {variable: "12345"}, clear=True):
        return snapshot() != before


# --- the cross-field checks ---------------------------------------------------------------------


def problems(objects: list[Obj]) -> list[str]:
    """Everything in the rendered objects that disagrees with the server or with itself."""
    found: list[str] = []
    for check in (check_deployment, check_probes, check_autoscaling, check_services):
        try:
            found += check(objects)
        except (AssertionError, KeyError, IndexError, TypeError, ValueError, ConfigError) as exc:
            found.append(f"{check.__name__}: {type(exc).__name__}: {exc}")
    return found


def check_deployment(objects: list[Obj]) -> list[str]:
    found = []
    deployment = one(objects, "Deployment", "warmserve")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    c = container(deployment)
    labels = spec["template"]["metadata"]["labels"]
    if not _selects(spec["selector"]["matchLabels"], labels):
        found.append("Deployment selector does not select its own pod template")
    strategy = spec.get("strategy", {})
    unavailable = strategy.get("rollingUpdate", {}).get("maxUnavailable")
    if strategy.get("type") != "RollingUpdate" or unavailable not in (0, "0%"):
        found.append(f"Deployment rolling update must have maxUnavailable 0, has {unavailable!r}")
    config = effective_server_config(c)
    gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
    if gpus and not config.require_gpu:
        found.append(
            f"the container takes nvidia.com/gpu: {gpus} without WARMSERVE_REQUIRE_GPU: a pod "
            "that cannot reach its GPU would serve from the CPU and report ready"
        )
    ports = named_ports(c)
    defaults = ServerConfig()
    for name, field in (("grpc", "grpc_port"), ("http", "http_port"), ("health", "health_port")):
        if name not in ports:
            found.append(f"container port {name!r} is missing")
        elif ports[name] != getattr(config, field):
            found.append(
                f"container port {name!r} is {ports[name]}, the server listens on "
                f"{field}={getattr(config, field)}"
            )
    for name, field in (("grpc", "grpc_port"), ("http", "http_port")):
        if ports.get(name) != getattr(defaults, field):
            found.append(
                f"container port {name!r} is {ports.get(name)}, the server's default {field} is "
                f"{getattr(defaults, field)} (clients and docs assume the default)"
            )
    if config.health_port <= 0:
        found.append("the health port is off (WARMSERVE_HEALTH_PORT / --health-port)")
    needed = shutdown_budget_s(config) + SHUTDOWN_MARGIN_S
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < needed:
        found.append(
            f"terminationGracePeriodSeconds {grace} < the server's shutdown budget "
            f"{shutdown_budget_s(config):g} s (drain delay {config.drain_delay_s:g} + waiting "
            f"for busy clients {connection_drain_s(config):g} + grace period "
            f"{config.grace_period_s:g} + stopping workers) + {SHUTDOWN_MARGIN_S:g} s margin"
        )
    age = config.max_connection_age_s
    if not age or age * 1.1 > config.drain_delay_s + connection_drain_s(config):
        found.append(
            f"max_connection_age_s {age:g}: a client connection must reach its age (+10 %) "
            f"within the drain delay and the wait for busy clients "
            f"({config.drain_delay_s:g} + {connection_drain_s(config):g} s), or a busy client "
            "still on it at the stop loses the calls gRPC's stop cancels"
        )
    for variable in manifest_env(c):
        if variable.startswith("WARMSERVE_") and not read_by_server(variable):
            found.append(f"env {variable} is not read by the server (typo or renamed setting?)")
    if pod.get("enableServiceLinks") is not False:
        found.append(
            "enableServiceLinks must be false: Service env vars share the WARMSERVE_ prefix"
        )
    found += _security_problems(pod, c)
    writable = {
        m["mountPath"]
        for m in c.get("volumeMounts", [])
        for v in pod.get("volumes", [])
        if v["name"] == m["name"] and "emptyDir" in v and not m.get("readOnly")
    }
    cache = str(cache_dir_from_env_of(c))
    if not any(cache == w or cache.startswith(w.rstrip("/") + "/") for w in writable):
        found.append(f"the cache dir {cache} is not on a writable emptyDir ({sorted(writable)})")
    if "/tmp" not in writable:
        found.append("/tmp must be a writable emptyDir (read-only root filesystem)")
    return found


def cache_dir_from_env_of(c: Obj) -> Path:
    with mock.patch.dict(os.environ, {**dockerfile_env(), **manifest_env(c)}, clear=True):
        return cache_dir_from_env()


def _security_problems(pod: Obj, c: Obj) -> list[str]:
    found = []
    pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        found.append("runAsNonRoot is not set")
    if sc.get("readOnlyRootFilesystem") is not True:
        found.append("readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        found.append("allowPrivilegeEscalation must be false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        found.append("capabilities must drop ALL")
    return found


def check_probes(objects: list[Obj]) -> list[str]:
    found = []
    deployment = one(objects, "Deployment", "warmserve")
    c = container(deployment)
    config = effective_server_config(c)
    health_port = named_ports(c).get("health")
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = c.get(kind)
        if probe is None or "grpc" not in probe:
            found.append(f"{kind} must be a native gRPC probe")
            continue
        port, service = probe["grpc"]["port"], probe["grpc"].get("service", "")
        if port != health_port or port != config.health_port:
            found.append(
                f"{kind} probes port {port}; the container's health port is {health_port}, the "
                f"server's health_port {config.health_port}"
            )
        if service not in HEALTH_SERVICES:
            found.append(f"{kind} asks for service {service!r}, not one of {HEALTH_SERVICES}")
        if kind == "livenessProbe" and service != LIVENESS_SERVICE:
            found.append(f"livenessProbe must ask for {LIVENESS_SERVICE!r}, asks for {service!r}")
        if kind != "livenessProbe" and service == LIVENESS_SERVICE:
            found.append(f"{kind} must ask for readiness, not {LIVENESS_SERVICE!r}")
    startup = c.get("startupProbe", {})
    budget = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
    floor = PoolConfig().startup_timeout_s + STARTUP_MARGIN_S
    if budget < floor:
        found.append(
            f"startup budget {budget} s < {floor:g} s (a worker's startup timeout "
            f"{PoolConfig().startup_timeout_s:g} s + {STARTUP_MARGIN_S:g} s): the kubelet would "
            "restart a pod whose worker is only slow before the server gives up on it"
        )
    deadline = deployment["spec"].get("progressDeadlineSeconds", 600)
    if deadline <= budget:
        found.append(f"progressDeadlineSeconds {deadline} <= startup budget {budget} s")
    return found


def check_autoscaling(objects: list[Obj]) -> list[str]:
    found = []
    deployment = one(objects, "Deployment", "warmserve")
    hpa = one(objects, "HorizontalPodAutoscaler")
    low, high = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
    if low < 2:
        found.append(f"HPA minReplicas {low} < 2")
    if low > high:
        found.append(f"HPA minReplicas {low} > maxReplicas {high}")
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref["kind"], ref["name"]) != ("Deployment", deployment["metadata"]["name"]):
        found.append(f"HPA scales {ref['kind']}/{ref['name']}, not the Deployment")
    replicas = deployment["spec"].get("replicas")
    if replicas is not None:
        found.append(
            f"Deployment sets replicas: {replicas} while the HPA owns the count: every apply "
            "would reset a scaled-up Deployment to it"
        )
    for metric in hpa["spec"].get("metrics", []):
        if metric["type"] == "Pods" and not exported_by_server(metric["pods"]["metric"]["name"]):
            found.append(f"HPA metric {metric['pods']['metric']['name']} is not exported")
    pdb = one(objects, "PodDisruptionBudget")
    spec = pdb["spec"]
    if ("minAvailable" in spec) == ("maxUnavailable" in spec):
        found.append("PodDisruptionBudget must set exactly one of minAvailable, maxUnavailable")
    if "maxUnavailable" not in spec:
        found.append(
            f"PDB minAvailable {spec.get('minAvailable')}: with the HPA's replica count changing, "
            "only maxUnavailable bounds how many pods a drain takes at once"
        )
    elif spec["maxUnavailable"] != 1:
        found.append(f"PDB maxUnavailable {spec['maxUnavailable']}: a drain takes more than 1 pod")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    if not _selects(spec["selector"]["matchLabels"], labels):
        found.append("PodDisruptionBudget selector does not select the pods")
    return found


def check_services(objects: list[Obj]) -> list[str]:
    found = []
    deployment = one(objects, "Deployment", "warmserve")
    ports = named_ports(container(deployment))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [o for o in objects if o["kind"] == "Service"]
    main = one(services, "Service", "warmserve")
    if {p["name"] for p in main["spec"]["ports"]} != {"grpc", "http", "health"}:
        found.append("Service warmserve must expose grpc, http and health")
    for service in services:
        if not _selects(service["spec"]["selector"], labels):
            found.append(f"Service {service['metadata']['name']} does not select the pods")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = ports.get(target) if isinstance(target, str) else target
            if number is None or number != ports.get(port["name"]):
                found.append(
                    f"Service {service['metadata']['name']} port {port['name']} targets {target}, "
                    f"the container's {port['name']} port is {ports.get(port['name'])}"
                )
            if port["port"] != ports.get(port["name"]):
                found.append(f"Service port {port['name']} is {port['port']}, not {number}")
    return found


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def exported_by_server(metric: str) -> bool:
    return any(f'"{metric}"' in p.read_text() for p in (ROOT / "serve").rglob("*.py"))


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_rendered_object_is_valid_kubernetes_strictly(rendered, target, version):
    assert rendered[target], f"{target} rendered no objects"
    for obj in rendered[target]:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{target} {name} invalid for Kubernetes {version}: {path}: {exc.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as exc:
            pytest.fail(f"{target} {name}: {exc.message}")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_manifests_agree_with_the_server(rendered, target):
    assert problems(rendered[target]) == []


def test_the_overlay_runs_one_gpu_per_pod_from_a_content_hashed_tag(rendered):
    deployment = one(rendered["overlay"], "Deployment", "warmserve")
    c = container(deployment)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    image, _, tag = c["image"].rpartition(":")
    assert image and "/" in image, f"the overlay must name a registry image, got {c['image']}"
    assert TAG_PATTERN.match(tag), f"{tag!r} is not <version>-<12 hex> (deploy/image_tag.py)"


def test_the_fallback_renderer_renders_what_kubectl_renders(render):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: nothing to compare the fallback renderer with")

    def key(o: Obj) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    for path in TARGETS.values():
        assert sorted(render.render_with_python(path), key=key) == sorted(
            render.render(path), key=key
        )


def test_the_dockerfile_matches_the_manifests(rendered):
    deployment = one(rendered["overlay"], "Deployment", "warmserve")
    c, pod = container(deployment), deployment["spec"]["template"]["spec"]
    final = dockerfile_instructions(final_stage=True)
    exposed = {int(p) for ln in final if ln.startswith("EXPOSE ") for p in ln.split()[1:]}
    assert exposed == set(named_ports(c).values())
    (user,) = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert int(user.split(":")[0]) == pod["securityContext"]["runAsUser"]
    assert 'ENTRYPOINT ["tini", "--"]' in final
    assert 'CMD ["warmserve", "serve", "--repository", "/models"]' in final
    assert dockerfile_env()["WARMSERVE_CACHE_DIR"].startswith("/tmp/")


def test_the_istio_example_hashes_a_header_onto_the_rendered_service(rendered):
    (rule,) = list(yaml.safe_load_all((K8S / "examples" / "istio-session-affinity.yaml").open()))
    service = one(rendered["overlay"], "Service", "warmserve")
    namespace = service["metadata"]["namespace"]
    assert (rule["apiVersion"], rule["kind"]) == ("networking.istio.io/v1", "DestinationRule")
    assert rule["metadata"]["namespace"] == namespace
    assert rule["spec"]["host"] == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert set(rule["spec"]) <= {"host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"}
    balancer = rule["spec"]["trafficPolicy"]["loadBalancer"]
    assert balancer == {"consistentHash": {"httpHeaderName": "x-session-id"}}
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["appProtocol"] == "grpc", "Istio must see the port as gRPC to hash per call"


def test_the_prometheus_adapter_rule_serves_the_metric_the_hpa_scales_on(rendered):
    values = yaml.safe_load((K8S / "examples" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    hpa = one(rendered["overlay"], "HorizontalPodAutoscaler")
    (metric,) = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert rule["name"]["as"] == metric
    assert rule["seriesQuery"].startswith(metric + "{")
    assert exported_by_server(metric)


def test_the_server_version_makes_a_valid_tag_prefix():
    assert TAG_PATTERN.match(f"{__version__}-{'0' * 12}")


# --- the checks catch drift (each mutation of a good rendering must be reported) ----------------


def _deployment(objects: list[Obj]) -> Obj:
    return one(objects, "Deployment", "warmserve")


def _env(objects: list[Obj], name: str) -> Obj:
    return next(e for e in container(_deployment(objects))["env"] if e["name"] == name)


def _probe(objects: list[Obj], kind: str) -> Obj:
    return container(_deployment(objects))[kind]["grpc"]


MUTATIONS: dict[str, tuple[Callable[[list[Obj]], None], str]] = {
    "liveness probes readiness": (
        lambda o: _probe(o, "livenessProbe").update(service=READINESS_SERVICE),
        "livenessProbe must ask for",
    ),
    "readiness probes an unknown service": (
        lambda o: _probe(o, "readinessProbe").update(service="ready"),
        "not one of",
    ),
    "probe on another port": (
        lambda o: _probe(o, "readinessProbe").update(port=9002),
        "readinessProbe probes port 9002",
    ),
    "server told another health port": (
        lambda o: _env(o, "WARMSERVE_HEALTH_PORT").update(value="9002"),
        "health_port=9002",
    ),
    "grpc port moved": (
        lambda o: container(_deployment(o))["ports"][0].update(containerPort=9001),
        "container port 'grpc' is 9001",
    ),
    "longer drain than termination grace": (
        lambda o: _env(o, "WARMSERVE_DRAIN_DELAY_S").update(value="60"),
        "terminationGracePeriodSeconds",
    ),
    "misspelt setting": (
        lambda o: _env(o, "WARMSERVE_GRACE_PERIOD_S").update(name="WARMSERVE_GRACE_S"),
        "WARMSERVE_GRACE_S is not read by the server",
    ),
    "short termination grace": (
        lambda o: _deployment(o)["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=5
        ),
        "terminationGracePeriodSeconds 5",
    ),
    "rollout may drop a pod": (
        lambda o: _deployment(o)["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1),
        "maxUnavailable 0",
    ),
    "one replica minimum": (
        lambda o: one(o, "HorizontalPodAutoscaler")["spec"].update(minReplicas=1),
        "minReplicas 1 < 2",
    ),
    "min above max": (
        lambda o: one(o, "HorizontalPodAutoscaler")["spec"].update(minReplicas=50),
        "> maxReplicas",
    ),
    "PDB with both bounds": (
        lambda o: one(o, "PodDisruptionBudget")["spec"].update(minAvailable=1),
        "exactly one of minAvailable",
    ),
    "PDB by minAvailable": (
        lambda o: (
            one(o, "PodDisruptionBudget")["spec"].pop("maxUnavailable"),
            one(o, "PodDisruptionBudget")["spec"].update(minAvailable=1),
        ),
        "PDB minAvailable 1",
    ),
    "PDB lets a drain take half the pods": (
        lambda o: one(o, "PodDisruptionBudget")["spec"].update(maxUnavailable="50%"),
        "PDB maxUnavailable 50%",
    ),
    "replica count in the manifest": (
        lambda o: _deployment(o)["spec"].update(replicas=2),
        "Deployment sets replicas: 2",
    ),
    "connections that outlive the drain": (
        lambda o: _env(o, "WARMSERVE_MAX_CONNECTION_AGE_S").update(value="60"),
        "max_connection_age_s 60: a client connection must reach its age",
    ),
    "no connection age": (
        lambda o: _env(o, "WARMSERVE_MAX_CONNECTION_AGE_S").update(value="0"),
        "max_connection_age_s 0: a client connection must reach its age",
    ),
    "relays without room to stop": (
        lambda o: (
            container(_deployment(o))["env"].append({"name": "WARMSERVE_FRONTENDS", "value": "4"})
            or _deployment(o)["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=40)
        ),
        "terminationGracePeriodSeconds 40 < the server's shutdown budget 50 s",
    ),
    "startup budget too short": (
        lambda o: container(_deployment(o))["startupProbe"].update(failureThreshold=2),
        "startup budget 10 s",
    ),
    "GPU pod allowed to fall back to the CPU": (
        lambda o: container(_deployment(o))["env"].remove(
            {"name": "WARMSERVE_REQUIRE_GPU", "value": "1"}
        ),
        "without WARMSERVE_REQUIRE_GPU",
    ),
    "writable root filesystem": (
        lambda o: container(_deployment(o))["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem",
    ),
    "service links on": (
        lambda o: _deployment(o)["spec"]["template"]["spec"].pop("enableServiceLinks"),
        "enableServiceLinks",
    ),
    "HPA on a metric the server does not export": (
        lambda o: one(o, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"].update(
            name="warmserve_queue_length"
        ),
        "warmserve_queue_length is not exported",
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_checks_catch_a_mutated_manifest(rendered, mutation):
    objects = copy.deepcopy(rendered["overlay"])
    mutate, expected = MUTATIONS[mutation]
    mutate(objects)
    found = problems(objects)
    assert any(expected in p for p in found), f"{mutation}: expected {expected!r} in {found}"


def test_the_checks_catch_a_renamed_health_service_in_the_server(rendered, monkeypatch):
    # as if serve.config.LIVENESS_SERVICE became "alive" while the manifests still say "liveness"
    monkeypatch.setitem(globals(), "LIVENESS_SERVICE", "alive")
    monkeypatch.setitem(globals(), "HEALTH_SERVICES", {"alive", READINESS_SERVICE, ""})
    found = problems(copy.deepcopy(rendered["overlay"]))
    assert any("livenessProbe asks for service 'liveness'" in p for p in found), found


def test_the_checks_catch_a_moved_server_default(rendered, monkeypatch):
    # as if the server's default gRPC port moved to 9001 while the manifests still say 8001
    moved = msgspec.structs.replace(ServerConfig(), grpc_port=9001)
    monkeypatch.setitem(globals(), "ServerConfig", lambda: moved)
    found = problems(copy.deepcopy(rendered["overlay"]))
    assert any("the server's default grpc_port is 9001" in p for p in found), found


# Repository paths named in the docs and manifests: ``deploy/...``, ``benchmarks/...`` and so on.
_REPO_PATH = re.compile(
    r"(?<![\w/.$-])((?:deploy|benchmarks|serve|tests|protos|scripts)/[\w./-]*\w)"
)
# Named but not files of the repository: kubectl's resource syntax, the overlay a user copies.
_NOT_FILES = {"deploy/warmserve", "deploy/k8s/overlays/mine"}


def _named_paths(text: str) -> list[tuple[int, str]]:
    """(line, path) of every repository path in ``text``, but globs and placeholders."""
    named = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in _REPO_PATH.finditer(line):
            after = line[match.end() : match.end() + 1]
            if after in ("*", "{", "<", "$") or match.group(1) in _NOT_FILES:
                continue
            named.append((number, match.group(1)))
    return named


def test_named_paths_are_found_in_a_line():
    text = "see deploy/k8s/base/hpa.yaml, `benchmarks/results/h200-2026-11-2*/` or deploy/warmserve"
    assert _named_paths(text) == [(1, "deploy/k8s/base/hpa.yaml")]


def _generated(path: str) -> bool:
    """Whether ``path`` lies in a folder .gitignore names (made by a build or a run: absent
    from a fresh clone)."""
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    folders = [line.rstrip("/") for line in ignored if line.endswith("/") and "*" not in line]
    return any(path == f or path.startswith(f"{f}/") for f in folders)


def test_generated_folders_are_told_apart():
    assert _generated("benchmarks/out") and _generated("serve/frontend/pb/x.py")
    assert not _generated("benchmarks/outline.py") and not _generated("deploy/k8s")


def test_every_repository_path_the_docs_and_manifests_name_exists():
    """A comment or a README that points to a file that is not there (a renamed example, say)
    sends the reader nowhere. Folders that builds and runs make are left out."""
    sources = [ROOT / "README.md", ROOT / "Makefile", *sorted(DEPLOY.rglob("*"))]
    missing = [
        f"{source.relative_to(ROOT)}:{number}: {path}"
        for source in sources
        if source.is_file() and source.suffix not in (".pyc",)
        for number, path in _named_paths(source.read_text(errors="replace"))
        if not (ROOT / path).exists() and not _generated(path)
    ]
    assert missing == []
