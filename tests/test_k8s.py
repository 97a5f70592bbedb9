"""Contract tests for the Kubernetes manifests in infra/k8s/ (no cluster here, so they are checked offline).

Built-in kinds are validated against the Kubernetes OpenAPI schemas that kubernetes-validate bundles, in
strict mode (an unknown or misspelt field fails); KEDA's ScaledObject against KEDA's own CRD schema, vendored
in tests/data/k8s/ and closed the same way. The cross-checks below each return a list of problems, and
`test_check_catches_mistake` shows every one of them failing on a broken copy of the manifests.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
KEDA_CRD = ROOT / "tests" / "data" / "k8s" / "keda.sh_scaledobjects.yaml"  # KEDA v2.20.2, see its header
COMPOSE = ROOT / "docker-compose.yml"
REDIS_CONF = ROOT / "infra" / "redis.conf"
# An old minor still under the clouds' extended support, and the newest kubernetes-validate 1.37 bundles.
KUBERNETES_VERSIONS = ("1.30", "1.37")
NAMESPACE = SECRET = "batchinfer"
EXAMPLES = {"secret.example.yaml", "submit-job.example.yaml"}  # documented, never applied by kustomize
WORKER, EXPORTER, FLOWER, REDIS = "batchinfer-worker", "batchinfer-exporter", "batchinfer-flower", "batchinfer-redis"
# The metrics-api trigger's metadata keys (KEDA docs, scalers/metrics-api.md; the CRD takes any string map).
METRICS_API_KEYS = {"url", "format", "valueLocation", "targetValue", "activationTargetValue", "unsafeSsl", "timeout",
                    "authMode", "method", "keyParamName", "aggregateFromKubeServiceEndpoints", "aggregationType"}
SECRET_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|AUTH|ACCESS_KEY|BROKER_URL|REDIS_URL|STATE_URL")
LITERAL_SECRET = re.compile(r"rediss?://[^:/@\s]*:[^@\s]+@|--requirepass|requirepass\s+[\"']?\w")

Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
DOCS = [d for p in MANIFESTS for d in _load(p)]


def _name(doc: Doc) -> str:
    meta = doc["metadata"]
    return f"{doc['kind']}/{meta.get('name') or meta.get('generateName')}"


def _get(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"].get("name") == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def _containers(workload: Doc, init: bool = True) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def _env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def _walk(obj: Any) -> Iterator[Any]:
    yield obj
    for child in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ():
        yield from _walk(child)


def _seconds(duration: str) -> int:
    """A compose duration ("2m", "1m30s", "90s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def _closed(schema: Any) -> Any:
    """Strict like the API server's field validation: objects with listed properties take no others."""
    for node in _walk(schema):
        if (isinstance(node, dict) and node.get("type") == "object" and "properties" in node
                and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
    return schema


def _keda_validator() -> jsonschema.protocols.Validator:
    crd = _load(KEDA_CRD)[0]
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return jsonschema.Draft7Validator(_closed(copy.deepcopy(version["schema"]["openAPIV3Schema"])))


KEDA = _keda_validator()


def schema_errors(doc: Doc, version: str) -> list[str]:
    if doc["kind"] == "ScaledObject":
        if doc["apiVersion"] != "keda.sh/v1alpha1":
            return [f"apiVersion {doc['apiVersion']}"]
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in KEDA.iter_errors(doc)]
        spec = doc["spec"]  # the CRD's one CEL rule, which jsonschema cannot run
        if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            errors.append("minReplicaCount must be less than or equal to maxReplicaCount")
        return errors
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def kustomization_problems(kustomization: Doc) -> list[str]:
    listed = kustomization.get("resources", [])
    problems = [f"{r} missing" for r in listed if not (K8S / r).is_file()]
    problems += [f"{r} is an example, not a resource" for r in listed if r in EXAMPLES]
    problems += [f"{p.name} not listed" for p in MANIFESTS if p.name not in EXAMPLES and p.name not in listed]
    if kustomization.get("namespace") != NAMESPACE:
        problems.append(f"namespace {kustomization.get('namespace')!r}")
    return problems


def namespace_problems(docs: list[Doc]) -> list[str]:
    problems = [f"{_name(d)} in namespace {d['metadata'].get('namespace')!r}" for d in docs
                if d["kind"] != "Namespace" and d["metadata"].get("namespace") != NAMESPACE]
    if [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] != [NAMESPACE]:
        problems.append(f"no Namespace {NAMESPACE}")
    return problems


def _selects(selector: dict[str, str], workload: Doc) -> bool:
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    return bool(selector) and selector.items() <= labels.items()


def selector_problems(docs: list[Doc]) -> list[str]:
    problems = []
    workloads = _workloads(docs)
    for w in workloads:
        if w["kind"] == "Job":
            continue
        selector = w["spec"]["selector"]["matchLabels"]
        picked = [_name(o) for o in workloads if _selects(selector, o)]
        if picked != [_name(w)]:
            problems.append(f"{_name(w)}'s selector picks the pods of {picked}")
    for svc in (d for d in docs if d["kind"] == "Service"):
        picked = [_name(o) for o in workloads if _selects(svc["spec"].get("selector", {}), o)]
        if len(picked) != 1:
            problems.append(f"{_name(svc)} selects the pods of {picked}")
    for sts in (d for d in docs if d["kind"] == "StatefulSet"):
        governing = _get(docs, "Service", sts["spec"]["serviceName"])
        if governing["spec"].get("clusterIP") != "None" or not _selects(governing["spec"]["selector"], sts):
            problems.append(f"{_name(sts)}: serviceName must be a headless Service selecting its pods")
    return problems


def _port_ok(port: int | str, container_ports: list[Doc]) -> bool:
    key = "name" if isinstance(port, str) else "containerPort"
    return any(p.get(key) == port for p in container_ports)


def port_problems(docs: list[Doc]) -> list[str]:
    problems = []
    workloads = _workloads(docs)
    for w in workloads:
        for c in _containers(w):
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                action = c.get(kind, {}).get("httpGet") or c.get(kind, {}).get("tcpSocket")
                if action and not _port_ok(action["port"], c.get("ports", [])):
                    problems.append(f"{_name(w)} {c['name']} {kind}: no port {action['port']!r}")
        annotated = w["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/port")
        all_ports = [p for c in _containers(w, init=False) for p in c.get("ports", [])]
        if annotated is not None and not _port_ok(int(annotated), all_ports):
            problems.append(f"{_name(w)}: prometheus.io/port {annotated} is no container port")
    for svc in (d for d in docs if d["kind"] == "Service"):
        pods = [w for w in workloads if _selects(svc["spec"].get("selector", {}), w)]
        pod_ports = [p for w in pods for c in _containers(w, init=False) for p in c.get("ports", [])]
        for port in svc["spec"]["ports"]:
            if not _port_ok(port.get("targetPort", port["port"]), pod_ports):
                problems.append(f"{_name(svc)}: targetPort {port.get('targetPort')!r} is no port of its pods")
    return problems


def _documented_keys(example_path: Path) -> set[str]:
    """The Secret keys that secret.example.yaml's `kubectl create secret` lines create."""
    comments = "\n".join(ln for ln in example_path.read_text().splitlines() if ln.lstrip().startswith("#"))
    return set(re.findall(r"--from-literal=([\w.-]+)=", comments))


def secret_problems(docs: list[Doc]) -> list[str]:
    example = _get(docs, "Secret", SECRET)
    documented, defined = _documented_keys(K8S / "secret.example.yaml"), set(example["stringData"])
    problems = [f"example key {k} not in the kubectl create secret lines" for k in defined - documented]
    for node in _walk([d for d in docs if d["kind"] != "Secret"]):
        ref = node.get("secretKeyRef") if isinstance(node, dict) else None
        if ref is None:
            continue
        if ref["name"] != SECRET or ref["key"] not in documented:
            problems.append(f"secretKeyRef {ref['name']}/{ref['key']} is not documented")
        elif not ref.get("optional") and ref["key"] not in defined:
            problems.append(f"required key {ref['key']} missing from the example Secret")
    return problems


def literal_secret_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        if doc["kind"] == "Secret":
            problems += [f"example value of {k} is not a <placeholder>" for k, v in doc["stringData"].items()
                         if "<" not in v]
            continue
        for node in _walk(doc):
            if isinstance(node, dict) and "name" in node and "value" in node and SECRET_ENV.search(node["name"]):
                problems.append(f"{_name(doc)}: {node['name']} has a literal value, not a secretKeyRef")
            if isinstance(node, str) and LITERAL_SECRET.search(node):
                problems.append(f"{_name(doc)}: literal secret in {node[:60]!r}")
    return problems


def _compose_worker() -> Doc:
    return yaml.safe_load(COMPOSE.read_text())["services"]["worker"]


def worker_problems(docs: list[Doc]) -> list[str]:
    worker = _get(docs, "Deployment", WORKER)
    pod, problems = worker["spec"]["template"]["spec"], []
    (container,) = pod["containers"]
    compose = _compose_worker()
    if worker["spec"].get("replicas", 0) != 0:
        problems.append("replicas set: KEDA owns the count")
    if container["image"] != compose["image"] or container["resources"]["limits"].get("nvidia.com/gpu") != 1:
        problems.append("not the GPU image with one nvidia.com/gpu")
    if " ".join(container["command"]) != compose["command"]:
        problems.append(f"command {container['command']} differs from compose's {compose['command']!r}")
    if pod.get("terminationGracePeriodSeconds", 30) < _seconds(compose["stop_grace_period"]):
        problems.append("terminationGracePeriodSeconds shorter than compose's stop_grace_period")
    metrics = [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"]
    if [int(_env(container)["BATCHINFER_METRICS_PORT"]["value"])] != metrics:
        problems.append(f"BATCHINFER_METRICS_PORT is not the metrics port {metrics}")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        if (get.get("path"), get.get("port")) != (path, "metrics"):
            problems.append(f"{probe} is not {path} on the metrics port")
    startup = container.get("startupProbe", {})
    allowance = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
        "failureThreshold", 3)
    if allowance < 120:
        problems.append(f"startupProbe allows {allowance} s, less than a TensorFlow import and model load")
    if worker["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge") != 0:
        problems.append("a rollout would ask for an extra GPU (maxSurge)")
    return problems


def scaling_problems(docs: list[Doc]) -> list[str]:
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    spec, problems = scaled["spec"], []
    target = spec["scaleTargetRef"]
    if (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment"), target["name"]) != (
            "apps/v1", "Deployment", WORKER):
        problems.append(f"scaleTargetRef {target} is not the worker Deployment")
    if spec.get("minReplicaCount") != 0 or spec.get("maxReplicaCount", 100) < 1:
        problems.append("does not scale from zero")
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    if trigger["type"] != "metrics-api" or set(meta) - METRICS_API_KEYS:
        problems.append(f"trigger {trigger['type']} with unknown keys {set(meta) - METRICS_API_KEYS}")
    wanted = {"valueLocation": "depth", "targetValue": "1", "activationTargetValue": "0"}
    if {k: meta.get(k) for k in wanted} != wanted:
        problems.append(f"trigger values {meta}")
    url = urlsplit(meta["url"])
    service = _get(docs, "Service", EXPORTER)
    (port,) = service["spec"]["ports"]
    if (url.hostname, url.port) != (f"{EXPORTER}.{NAMESPACE}.svc.cluster.local", port["port"]):
        problems.append(f"{meta['url']} is not the exporter Service")
    worker_env = _env(_get(docs, "Deployment", WORKER)["spec"]["template"]["spec"]["containers"][0])
    queue = worker_env.get("BATCHINFER_QUEUE", {}).get("value") or Settings().queue
    if url.path != f"/queue/{queue}":
        problems.append(f"{url.path} is not the workers' queue {queue}")
    (exporter,) = _get(docs, "Deployment", EXPORTER)["spec"]["template"]["spec"]["containers"]
    argv, listens = exporter["command"], [p["containerPort"] for p in exporter["ports"] if p["name"] == "http"]
    if argv[:2] != ["batchinfer", "exporter"] or argv[argv.index("--host") + 1] != "0.0.0.0" or [
            int(argv[argv.index("--port") + 1])] != listens:
        problems.append(f"exporter command {argv} does not listen on its container port {listens}")
    return problems


def _redis_directives(text: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            directives.setdefault(key.lower(), []).append(value.strip())
    return directives


def _quantity(text: str) -> int:
    units = {"": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", text).groups()  # type: ignore[union-attr]
    return int(number) * units[unit]


def redis_problems(docs: list[Doc]) -> list[str]:
    conf = _redis_directives(_get(docs, "ConfigMap", "batchinfer-redis-config")["data"]["redis.conf"])
    maxmemory = conf.pop("maxmemory", ["0"])[0]
    problems = [] if conf == _redis_directives(REDIS_CONF.read_text()) else ["the ConfigMap differs from redis.conf"]
    sts = _get(docs, "StatefulSet", REDIS)
    (redis,) = _containers(sts, init=False)
    if not 0 < _quantity(maxmemory) < _quantity(redis["resources"]["limits"]["memory"]):
        problems.append(f"maxmemory {maxmemory} is not below the container's memory limit")
    data = [m["mountPath"] for m in redis["volumeMounts"] if m["name"] == "data"]
    claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    if data != conf["dir"] or "data" not in claims:
        problems.append(f"the dir {conf['dir']} is not the data volume {data}")
    init = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in sts["spec"]["template"]["spec"]
                    ["initContainers"])
    if redis["command"][-1] not in init or "$REDIS_PASSWORD" not in init:
        problems.append("the init container does not write the config redis-server reads")
    if _env(redis).get("REDISCLI_AUTH", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("key") != "redis-password":
        problems.append("the probes' redis-cli has no password")
    broker = urlsplit(_get(docs, "Secret", SECRET)["stringData"]["broker-url"])
    (port,) = _get(docs, "Service", REDIS)["spec"]["ports"]
    if (broker.hostname, broker.port) != (REDIS, port["port"]):
        problems.append(f"the example broker URL does not point at the {REDIS} Service")
    return problems


def flower_problems(docs: list[Doc]) -> list[str]:
    (flower,) = _get(docs, "Deployment", FLOWER)["spec"]["template"]["spec"]["containers"]
    env = _env(flower)
    refs = {k: env.get(k, {}).get("valueFrom", {}).get("secretKeyRef", {}).get("key")
            for k in ("CELERY_BROKER_URL", "FLOWER_BASIC_AUTH")}
    problems = [] if refs == {"CELERY_BROKER_URL": "broker-url", "FLOWER_BASIC_AUTH": "flower-basic-auth"} else [
        f"Flower's broker and basic auth are not from the Secret: {refs}"]
    if any(a.startswith(("--broker", "-b", "--basic")) for a in flower["command"] + flower.get("args", [])):
        problems.append("broker or credentials on Flower's command line")
    return problems


CHECKS: dict[str, Callable[[list[Doc]], list[str]]] = {
    "namespace": namespace_problems, "selectors": selector_problems, "ports": port_problems,
    "secrets": secret_problems, "no literal secrets": literal_secret_problems, "worker": worker_problems,
    "scaling": scaling_problems, "redis": redis_problems, "flower": flower_problems,
}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_manifest_validates_strictly(doc, version):
    assert schema_errors(doc, version) == []


@pytest.mark.parametrize("check", CHECKS)
def test_manifests_pass(check):
    assert CHECKS[check](DOCS) == []


def test_kustomization_lists_every_manifest_but_the_examples():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization" and kustomization_problems(kustomization) == []
    broken = copy.deepcopy(kustomization)
    broken["resources"] = [r for r in broken["resources"] if r != "flower.yaml"] + ["secret.example.yaml"]
    assert len(kustomization_problems(broken)) == 2


def _edit(kind: str, name: str, change: Callable[[Doc], Any]) -> Callable[[list[Doc]], None]:
    return lambda docs: change(_get(docs, kind, name))


def _worker(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]["containers"][0]


SCHEMA_MISTAKES = {
    "misspelt field": _edit("Deployment", WORKER, lambda d: d["spec"]["template"]["spec"].update(
        terminationGracePeriod=150)),
    "port as a string": _edit("Deployment", WORKER, lambda d: _worker(d)["ports"][0].update(containerPort="9808")),
    "container without a name": _edit("StatefulSet", REDIS, lambda d: _worker(d).pop("name")),
    "KEDA: misspelt field": _edit("ScaledObject", WORKER, lambda d: d["spec"].update(cooldownPeriods=300)),
    "KEDA: number for a string": _edit("ScaledObject", WORKER, lambda d: d["spec"]["triggers"][0]["metadata"].update(
        targetValue=1)),
    "KEDA: min above max": _edit("ScaledObject", WORKER, lambda d: d["spec"].update(minReplicaCount=9)),
}


@pytest.mark.parametrize("mistake", SCHEMA_MISTAKES)
def test_schema_catches_mistake(mistake):
    docs = copy.deepcopy(DOCS)
    SCHEMA_MISTAKES[mistake](docs)
    assert any(schema_errors(d, KUBERNETES_VERSIONS[-1]) for d in docs)


MISTAKES = [
    ("namespace", _edit("Service", FLOWER, lambda d: d["metadata"].update(namespace="default"))),
    ("selectors", _edit("Deployment", FLOWER, lambda d: d["spec"]["template"]["metadata"]["labels"].update(
        {"app.kubernetes.io/component": "ui"}))),
    ("selectors", _edit("Deployment", WORKER, lambda d: d["spec"]["selector"]["matchLabels"].pop(
        "app.kubernetes.io/component"))),
    ("ports", _edit("Deployment", WORKER, lambda d: _worker(d)["ports"][0].update(name="metric"))),
    ("ports", _edit("Service", EXPORTER, lambda d: d["spec"]["ports"][0].update(targetPort=9000))),
    ("secrets", _edit("Deployment", WORKER, lambda d: _env(_worker(d))["BATCHINFER_BROKER_URL"]["valueFrom"][
        "secretKeyRef"].update(key="broker_url"))),
    ("no literal secrets", _edit("Deployment", EXPORTER, lambda d: _worker(d)["env"].__setitem__(
        0, {"name": "BATCHINFER_BROKER_URL", "value": "redis://:hunter2@batchinfer-redis:6379/0"}))),
    ("no literal secrets", _edit("StatefulSet", REDIS, lambda d: _worker(d)["command"].extend(
        ["--requirepass", "hunter2"]))),
    ("worker", _edit("Deployment", WORKER, lambda d: d["spec"]["template"]["spec"].update(
        terminationGracePeriodSeconds=60))),
    ("worker", _edit("Deployment", WORKER, lambda d: _env(_worker(d))["BATCHINFER_METRICS_PORT"].update(
        value="9809"))),
    ("worker", _edit("Deployment", WORKER, lambda d: d["spec"].update(replicas=2))),
    ("scaling", _edit("ScaledObject", WORKER, lambda d: d["spec"]["scaleTargetRef"].update(name="worker"))),
    ("scaling", _edit("ScaledObject", WORKER, lambda d: d["spec"]["triggers"][0]["metadata"].update(
        url="http://batchinfer-exporter.batchinfer.svc.cluster.local:9809/queue/celery"))),
    ("redis", _edit("ConfigMap", "batchinfer-redis-config", lambda d: d["data"].update(
        {"redis.conf": d["data"]["redis.conf"].replace("appendonly yes", "appendonly no")}))),
    ("flower", _edit("Deployment", FLOWER, lambda d: _worker(d).update(
        command=["celery", "--broker=$(CELERY_BROKER_URL)", "flower"]))),
]


@pytest.mark.parametrize(("check", "mistake"), MISTAKES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(MISTAKES)])
def test_check_catches_mistake(check, mistake):
    docs = copy.deepcopy(DOCS)
    mistake(docs)
    assert CHECKS[check](docs), f"{check} missed it"


def test_every_check_is_shown_failing():
    assert {check for check, _ in MISTAKES} == set(CHECKS)
