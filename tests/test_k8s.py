"""Contract tests for the Kubernetes manifests in infra/k8s/ (no cluster here, so they are checked offline).

Built-in kinds are validated against the Kubernetes OpenAPI schemas that kubernetes-validate bundles, in
strict mode (an unknown or misspelt field fails); KEDA's ScaledObject against KEDA's own CRD schema, vendored
in tests/data/k8s/ and closed the same way. The cross-checks below each return a list of problems, and
`test_check_catches_mistake` shows every one of them failing on a broken copy of the manifests. The Redis ACL
wiring also runs for real: the init container's script on the files the pods would see, a redis-server loading
its ACL file, and each component logging in from its own pod's environment.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml

from tests.conftest import free_port, stop_process, wait_until
from workers.redis_conn import redis_client
from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
KEDA_CRD = ROOT / "tests" / "data" / "k8s" / "keda.sh_scaledobjects.yaml"  # KEDA v2.20.2, see its header
COMPOSE = ROOT / "docker-compose.yml"
REDIS_CONF = ROOT / "infra" / "redis.conf"
ACL_SOURCES = ROOT / "infra" / "redis"  # users.acl.in and render-acl.sh, copied into the Redis ConfigMap
# An old minor still under the clouds' extended support, and the newest kubernetes-validate 1.37 bundles.
KUBERNETES_VERSIONS = ("1.30", "1.37")
NAMESPACE = SECRET = "batchinfer"
EXAMPLES = {"secret.example.yaml", "submit-job.example.yaml"}  # documented, never applied by kustomize
WORKER, EXPORTER, FLOWER, REDIS = "batchinfer-worker", "batchinfer-exporter", "batchinfer-flower", "batchinfer-redis"
CONFIG, REDIS_CONFIG = "batchinfer", "batchinfer-redis-config"  # the clients' settings (config.yaml); Redis's files
# Each Redis client and the ACL user it logs in as (infra/redis/users.acl.in).
CLIENTS = {f"Deployment/{WORKER}": "worker", f"Deployment/{EXPORTER}": "reader", f"Deployment/{FLOWER}": "flower",
           "Job/batchinfer-submit-": "producer"}
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


def _ref(var: Doc | None, kind: str) -> tuple[str, str] | None:
    """(name, key) of an env var's configMapKeyRef or secretKeyRef."""
    ref = (var or {}).get("valueFrom", {}).get(kind)
    return (ref["name"], ref["key"]) if ref else None


def _pod(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def _by_name(docs: list[Doc], name: str) -> Doc:
    """The object `_name` calls ``name`` (the submit Job has a generateName only)."""
    (found,) = [d for d in docs if _name(d) == name]
    return found


def _volume_at(pod: Doc, container: Doc, path: str) -> Doc:
    """The volume a container sees ``path`` on (its longest mountPath above it), or {}."""
    mounts = [m for m in container.get("volumeMounts", []) if f"{path}/".startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return {}
    name = max(mounts, key=lambda m: len(m["mountPath"]))["name"]
    return next((v for v in pod.get("volumes", []) if v["name"] == name), {})


def _secret_files(pod: Doc, container: Doc) -> dict[str, tuple[str, int]]:
    """The Secret's files a container sees, as the kubelet lays them out: path -> (key, mode)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")
        for item in secret.get("items", []) if secret and secret.get("secretName") == SECRET else []:
            mode = item.get("mode", secret.get("defaultMode", 0o644))
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (item["key"], mode)
    return files


def _readable(pod: Doc, mode: int) -> bool:
    """Whether the pod's (non-root) user can read a Secret file of this mode: the kubelet gives it the group
    fsGroup, when there is one."""
    return bool(mode & 0o004 or (mode & 0o040 and "fsGroup" in pod.get("securityContext", {})))


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


def _secret_refs(node: Any) -> Iterator[tuple[str, str, bool]]:
    """(Secret, key, optional) of what a manifest node reads: an env var's secretKeyRef or a volume's items."""
    if not isinstance(node, dict):
        return
    if ref := node.get("secretKeyRef"):
        yield ref["name"], ref["key"], bool(ref.get("optional"))
    if isinstance(secret := node.get("secret"), dict) and "secretName" in secret:
        for item in secret.get("items", []):
            yield secret["secretName"], item["key"], bool(secret.get("optional"))


def secret_problems(docs: list[Doc]) -> list[str]:
    example = _get(docs, "Secret", SECRET)
    documented, defined = _documented_keys(K8S / "secret.example.yaml"), set(example["stringData"])
    problems = [f"example key {k} not in the kubectl create secret lines" for k in defined - documented]
    read = set()
    for node in _walk([d for d in docs if d["kind"] != "Secret"]):
        if isinstance(node, dict) and isinstance(node.get("secret"), dict) and not node["secret"].get("items"):
            problems.append(f"volume {node.get('name')} projects every key (every password): list its items")
        for name, key, optional in _secret_refs(node):
            read.add(key)
            if name != SECRET or key not in documented:
                problems.append(f"Secret key {name}/{key} is not documented")
            elif not optional and key not in defined:
                problems.append(f"required key {key} missing from the example Secret")
    problems += [f"documented key {k} is read by nothing" for k in sorted(documented - read)]
    return list(dict.fromkeys(problems))  # a key mounted in several pods: one line


def _secret_free(name: str, value: str) -> bool:
    """Whether a literal value of a secret-sounding variable holds no secret: a file's path (the secret is in
    the file) or a URL that names its user but has no password."""
    if name.endswith("_FILE"):
        return value.startswith("/")
    userinfo = value.partition("://")[2].partition("/")[0].rpartition("@")[0]
    return name.endswith("_URL") and "://" in value and ":" not in userinfo and "password=" not in value


def literal_secret_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        if doc["kind"] == "Secret":
            problems += [f"example value of {k} is not a <placeholder>" for k, v in doc["stringData"].items()
                         if "<" not in v]
            continue
        for node in _walk(doc):
            if (isinstance(node, dict) and "name" in node and "value" in node and SECRET_ENV.search(node["name"])
                    and not _secret_free(node["name"], str(node["value"]))):
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
    files = _get(docs, "ConfigMap", REDIS_CONFIG)["data"]
    conf = _redis_directives(files["redis.conf"])
    maxmemory = conf.pop("maxmemory", ["0"])[0]
    problems = [] if conf == _redis_directives(REDIS_CONF.read_text()) else ["the ConfigMap differs from redis.conf"]
    problems += [f"the ConfigMap's {f} is not infra/redis/{f}" for f in ("users.acl.in", "render-acl.sh")
                 if files.get(f) != (ACL_SOURCES / f).read_text()]
    sts = _get(docs, "StatefulSet", REDIS)
    (server,) = _containers(sts, init=False)
    if not 0 < _quantity(maxmemory) < _quantity(server["resources"]["limits"]["memory"]):
        problems.append(f"maxmemory {maxmemory} is not below the container's memory limit")
    data = [m["mountPath"] for m in server["volumeMounts"] if m["name"] == "data"]
    claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    if data != conf["dir"] or "data" not in claims:
        problems.append(f"the dir {conf['dir']} is not the data volume {data}")
    command = server["command"]
    if command[0] != "redis-server" or _volume_at(_pod(sts), server, command[1]).get("configMap", {}).get(
            "name") != REDIS_CONFIG:
        problems.append(f"{command} does not read the ConfigMap's redis.conf")
    if "requirepass" in conf or any("requirepass" in s for s in _walk(sts) if isinstance(s, str)):
        problems.append("requirepass: the ACL file holds the passwords")
    (port,) = _get(docs, "Service", REDIS)["spec"]["ports"]
    address = _get(docs, "ConfigMap", CONFIG)["data"]["redis-address"]
    if address != f"{REDIS}:{port['port']}" or conf["port"] != ["6379"]:  # redis-cli's default, for the probe
        problems.append(f"the clients' redis-address {address} is not the {REDIS} Service")
    return problems


def _client_problems(pod: Doc, container: Doc, user: str) -> list[str]:
    env, order = _env(container), [e["name"] for e in container["env"]]
    problems = []
    url = env["BATCHINFER_BROKER_URL"].get("value")
    # database 0: the ACL's channel rules name it (users.acl.in)
    if url != f"$(REDIS_SCHEME)://{user}@$(REDIS_ADDRESS)/0":
        problems.append(f"BATCHINFER_BROKER_URL {url!r} is not the {user} user at the ConfigMap's address")
    for name, key in (("REDIS_SCHEME", "redis-scheme"), ("REDIS_ADDRESS", "redis-address"),
                      ("BATCHINFER_NAMESPACE", "namespace")):
        if _ref(env.get(name), "configMapKeyRef") != (CONFIG, key):
            problems.append(f"{name} is not the ConfigMap's {key}")
        elif name.startswith("REDIS_") and order.index(name) > order.index("BATCHINFER_BROKER_URL"):
            problems.append(f"{name} comes after the URL: Kubernetes expands only the variables listed before")
    path = env.get("BATCHINFER_REDIS_PASSWORD_FILE", {}).get("value", "")
    files = _secret_files(pod, container)
    key, mode = files.get(path, ("", 0))
    if key != f"redis-{user}-password" or not _readable(pod, mode):
        problems.append(f"BATCHINFER_REDIS_PASSWORD_FILE {path} is no readable file of key redis-{user}-password")
    if others := {k for k, _ in files.values()} - {f"redis-{user}-password"}:
        problems.append(f"also sees {sorted(others)}")
    return problems


def _secrets_dir(docs: list[Doc], init: Doc) -> str:
    """Where render-acl.sh looks for the password files: REDIS_SECRETS_DIR, or the script's default."""
    script = _get(docs, "ConfigMap", REDIS_CONFIG)["data"]["render-acl.sh"]
    default = re.search(r"REDIS_SECRETS_DIR:-([^}]+)}", script)
    return _env(init).get("REDIS_SECRETS_DIR", {}).get("value") or (default.group(1) if default else "")


def _acl_file_problems(docs: list[Doc]) -> list[str]:
    sts = _get(docs, "StatefulSet", REDIS)
    pod, problems = _pod(sts), []
    (init,), (server,) = pod["initContainers"], pod["containers"]
    render = re.fullmatch(r"sh (\S+/render-acl\.sh) (\S+)", " ".join(init["command"] + init.get("args", [])))
    aclfile = server["command"][server["command"].index("--aclfile") + 1] if "--aclfile" in server["command"] else None
    if not render or render[2] != aclfile:
        problems.append(f"the init container does not render the ACL file redis-server loads ({aclfile})")
    elif not _volume_at(pod, init, aclfile).get("emptyDir") or _volume_at(pod, init, aclfile) != _volume_at(
            pod, server, aclfile):
        problems.append(f"{aclfile} is not on an emptyDir both containers mount")
    elif _volume_at(pod, init, render[1]).get("configMap", {}).get("name") != REDIS_CONFIG:
        problems.append(f"{render[1]} is not the ConfigMap's")
    users = re.findall(r"^user (\S+) on ", _get(docs, "ConfigMap", REDIS_CONFIG)["data"]["users.acl.in"], re.M)
    files, folder = _secret_files(pod, init), _secrets_dir(docs, init)
    for user in users:
        key, mode = files.get(f"{folder}/redis_{user}_password", ("", 0))
        if key != f"redis-{user}-password" or not _readable(pod, mode):
            problems.append(f"render-acl.sh cannot read {folder}/redis_{user}_password (redis-{user}-password)")
    if _ref(_env(init).get("BATCHINFER_NAMESPACE"), "configMapKeyRef") != (CONFIG, "namespace"):
        problems.append("the ACL file's namespace is not the ConfigMap's, which the clients use")
    probe = " ".join(server.get("readinessProbe", {}).get("exec", {}).get("command", []))
    login = re.search(r'REDISCLI_AUTH="\$\(cat (\S+)\)" redis-cli --user (\S+) ping', probe)
    files = _secret_files(pod, server)
    key, mode = files.get(login[1], ("", 0)) if login else ("", 0)
    if not login or login[2] != "admin" or key != "redis-admin-password" or not _readable(pod, mode):
        problems.append(f"the probe does not log in as admin from its password file: {probe!r}")
    if {k for k, _ in files.values()} != {"redis-admin-password"} or "REDISCLI_AUTH" in _env(server):
        problems.append("the redis container sees more than the admin password file")
    return problems


def redis_user_problems(docs: list[Doc]) -> list[str]:
    problems = [f"{name} missing" for name in set(CLIENTS) - {_name(w) for w in _workloads(docs)}]
    for w in _workloads(docs):
        for c in _containers(w):
            if "BATCHINFER_BROKER_URL" not in _env(c):
                continue
            if _name(w) not in CLIENTS:
                problems.append(f"{_name(w)} logs in as which Redis user? (CLIENTS)")
                continue
            problems += [f"{_name(w)} {c['name']}: {p}" for p in _client_problems(_pod(w), c, CLIENTS[_name(w)])]
    return problems + _acl_file_problems(docs)


def flower_problems(docs: list[Doc]) -> list[str]:
    (flower,) = _get(docs, "Deployment", FLOWER)["spec"]["template"]["spec"]["containers"]
    (exporter,) = _get(docs, "Deployment", EXPORTER)["spec"]["template"]["spec"]["containers"]
    env, problems = _env(flower), []
    if _ref(env.get("FLOWER_BASIC_AUTH"), "secretKeyRef") != (SECRET, "flower-basic-auth"):
        problems.append("Flower's basic auth is not from the Secret")
    if "CELERY_BROKER_URL" in env:
        problems.append("CELERY_BROKER_URL: Celery would prefer it to the app's URL and password file")
    # The app's settings (namespace, password file, TLS, signing) need our app, on the CPU image with the extra.
    if flower["image"] != exporter["image"] or flower["command"][:4] != ["celery", "-A", "workers", "flower"]:
        problems.append(f"{flower['image']} {flower['command']} is not `celery -A workers flower` on the CPU image")
    if any(a.startswith(("--broker", "-b", "--basic")) for a in flower["command"] + flower.get("args", [])):
        problems.append("broker or credentials on Flower's command line")
    return problems


CHECKS: dict[str, Callable[[list[Doc]], list[str]]] = {
    "namespace": namespace_problems, "selectors": selector_problems, "ports": port_problems,
    "secrets": secret_problems, "no literal secrets": literal_secret_problems, "worker": worker_problems,
    "scaling": scaling_problems, "redis": redis_problems, "redis users": redis_user_problems,
    "flower": flower_problems,
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


def _literal(container: Doc, name: str, value: str) -> None:
    var = _env(container)[name]
    var.pop("valueFrom", None)
    var["value"] = value


def _volume(doc: Doc, name: str) -> Doc:
    return next(v for v in doc["spec"]["template"]["spec"]["volumes"] if v["name"] == name)


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
    ("secrets", _edit("Deployment", FLOWER, lambda d: _env(_worker(d))["FLOWER_BASIC_AUTH"]["valueFrom"][
        "secretKeyRef"].update(key="flower_basic_auth"))),
    ("secrets", _edit("Deployment", WORKER, lambda d: _volume(d, "redis-password")["secret"].pop("items"))),
    ("secrets", _edit("Secret", SECRET, lambda d: d["stringData"].pop("redis-reader-password"))),
    ("secrets", _edit("StatefulSet", REDIS, lambda d: d["spec"]["template"]["spec"]["volumes"].append(
        {"name": "stale", "secret": {"secretName": SECRET, "items": [{"key": "redis-password", "path": "p"}]}}))),
    ("no literal secrets", _edit("Deployment", EXPORTER, lambda d: _env(_worker(d))["BATCHINFER_BROKER_URL"].update(
        value="redis://reader:hunter2@batchinfer-redis:6379/0"))),
    ("no literal secrets", _edit("Deployment", EXPORTER, lambda d: _env(_worker(d))[
        "BATCHINFER_REDIS_PASSWORD_FILE"].update(value="hunter2"))),
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
    ("redis", _edit("ConfigMap", REDIS_CONFIG, lambda d: d["data"].update(
        {"redis.conf": d["data"]["redis.conf"].replace("appendonly yes", "appendonly no")}))),
    ("redis", _edit("ConfigMap", REDIS_CONFIG, lambda d: d["data"].update(
        {"users.acl.in": d["data"]["users.acl.in"].replace("user default off", "user default on nopass")}))),
    ("redis", _edit("ConfigMap", CONFIG, lambda d: d["data"].update({"redis-address": "redis:6379"}))),
    ("redis", _edit("StatefulSet", REDIS, lambda d: _worker(d).update(command=["redis-server", "/data/redis.conf"]))),
    ("redis users", _edit("Deployment", WORKER, lambda d: _env(_worker(d))["BATCHINFER_BROKER_URL"].update(
        value="$(REDIS_SCHEME)://admin@$(REDIS_ADDRESS)/0"))),
    ("redis users", lambda docs: _env(_worker(_by_name(docs, "Job/batchinfer-submit-")))[
        "BATCHINFER_BROKER_URL"].update(value="$(REDIS_SCHEME)://worker@$(REDIS_ADDRESS)/0")),
    ("redis users", _edit("Deployment", EXPORTER, lambda d: _env(_worker(d))["BATCHINFER_REDIS_PASSWORD_FILE"].update(
        value="/run/secrets/batchinfer/redis_worker_password"))),
    ("redis users", _edit("Deployment", FLOWER, lambda d: _volume(d, "redis-password")["secret"]["items"][0].update(
        key="redis-admin-password"))),
    ("redis users", _edit("Deployment", EXPORTER, lambda d: d["spec"]["template"]["spec"]["securityContext"].pop(
        "fsGroup"))),
    ("redis users", _edit("Deployment", FLOWER, lambda d: _literal(_worker(d), "BATCHINFER_NAMESPACE", "batchinfer"))),
    ("redis users", _edit("Deployment", WORKER, lambda d: _worker(d)["env"].append(_worker(d)["env"].pop(0)))),
    ("redis users", _edit("StatefulSet", REDIS, lambda d: _worker(d).update(
        command=["redis-server", "/config/redis.conf", "--aclfile", "/data/users.acl"]))),
    ("redis users", _edit("StatefulSet", REDIS, lambda d: _volume(d, "redis-passwords")["secret"]["items"][3].update(
        path="reader_password"))),
    ("redis users", _edit("StatefulSet", REDIS, lambda d: d["spec"]["template"]["spec"]["initContainers"][0].update(
        env=[]))),
    ("redis users", _edit("StatefulSet", REDIS, lambda d: _worker(d)["readinessProbe"]["exec"].update(
        command=["sh", "-c", "redis-cli ping | grep -q PONG"]))),
    ("flower", _edit("Deployment", FLOWER, lambda d: _worker(d).update(
        command=["celery", "--broker=$(CELERY_BROKER_URL)", "flower"]))),
    ("flower", _edit("Deployment", FLOWER, lambda d: _worker(d).update(image="mher/flower:2.0"))),
    ("flower", _edit("Deployment", FLOWER, lambda d: _worker(d)["env"].append(
        {"name": "CELERY_BROKER_URL", "value": "$(BATCHINFER_BROKER_URL)"}))),
]


@pytest.mark.parametrize(("check", "mistake"), MISTAKES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(MISTAKES)])
def test_check_catches_mistake(check, mistake):
    docs = copy.deepcopy(DOCS)
    mistake(docs)
    assert CHECKS[check](docs), f"{check} missed it"


def test_every_check_is_shown_failing():
    assert {check for check, _ in MISTAKES} == set(CHECKS)


def _lay_out(docs: list[Doc], pod: Doc, container: Doc, root: Path, secret: dict[str, str], shared: Path) -> None:
    """A container's volumes under ``root`` as the kubelet mounts them: the Secret's items with their modes, the
    ConfigMap's files, emptyDirs shared with the pod's other containers (through ``shared``); no claims."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume, where = volumes.get(mount["name"], {}), root / mount["mountPath"].lstrip("/")  # {}: a claim
        where.parent.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            (shared / mount["name"]).mkdir(parents=True, exist_ok=True)
            where.symlink_to(shared / mount["name"])
        elif "secret" in volume:
            where.mkdir()
            for item in volume["secret"]["items"]:
                (where / item["path"]).write_text(secret[item["key"]])
                (where / item["path"]).chmod(item.get("mode", volume["secret"].get("defaultMode", 0o644)))
        elif "configMap" in volume:
            where.mkdir()
            for key, text in _get(docs, "ConfigMap", volume["configMap"]["name"])["data"].items():
                (where / key).write_text(text)


def _environment(docs: list[Doc], container: Doc) -> dict[str, str]:
    """A container's environment as the kubelet builds it: ConfigMap keys resolved, each $(VAR) expanded from the
    variables listed before it; Secret keys (Flower's basic auth, AWS's) left out, no Redis client reads them."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif ref := _ref(var, "configMapKeyRef"):
            env[var["name"]] = _get(docs, "ConfigMap", ref[0])["data"][ref[1]]
    return env


def _in_root(text: str, root: Path) -> str:
    """A command's absolute paths moved under ``root``, where `_lay_out` put the container's files."""
    return re.sub(r"(?<![\w./-])/(?=[\w.])", f"{root}/", text)


def test_each_pod_logs_in_as_its_user_to_redis_set_up_as_the_manifests_do(tmp_path):
    """Real components: the Secret's keys as the pods would see them, the init container's command (the
    ConfigMap's render-acl.sh) writing the ACL file, a real redis-server loading it, its readiness probe, and
    each client's settings built from its own pod's environment and files, logging in as its own user."""
    docs, port = copy.deepcopy(DOCS), free_port()
    _get(docs, "ConfigMap", CONFIG)["data"]["redis-address"] = f"127.0.0.1:{port}"  # where Redis runs here
    secret = {key: secrets.token_hex(32) for key in _get(docs, "Secret", SECRET)["stringData"]}
    pod = _pod(_get(docs, "StatefulSet", REDIS))
    (init,), (server,) = pod["initContainers"], pod["containers"]
    roots = {c["name"]: tmp_path / "redis" / c["name"] for c in (init, server)}
    for c in (init, server):
        _lay_out(docs, pod, c, roots[c["name"]], secret, tmp_path / "redis" / "volumes")

    env = {**_environment(docs, init), "PATH": os.environ["PATH"],
           "REDIS_SECRETS_DIR": _in_root(_secrets_dir(docs, init), roots[init["name"]])}
    subprocess.run([_in_root(a, roots[init["name"]]) for a in init["command"] + init.get("args", [])],
                   env=env, check=True, timeout=30)
    command = server["command"]
    aclfile = _in_root(command[command.index("--aclfile") + 1], roots[server["name"]])
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--aclfile", aclfile],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the readiness probe as the kubelet runs it, on this port (the pod's is redis-cli's default, 6379)
        probe = [_in_root(a, roots[server["name"]]).replace("redis-cli ", f"redis-cli -p {port} ")
                 for a in server["readinessProbe"]["exec"]["command"]]
        wait_until(lambda: subprocess.run(probe, capture_output=True, timeout=10).returncode == 0, 20,
                   "the readiness probe")
        anonymous = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, timeout=10)
        assert "NOAUTH" in anonymous.stdout + anonymous.stderr, "the default user is off"

        namespace = _get(docs, "ConfigMap", CONFIG)["data"]["namespace"]
        for name, user in CLIENTS.items():
            client_pod = _pod(_by_name(docs, name))
            (container,) = client_pod["containers"]
            root = tmp_path / name.replace("/", "-")
            _lay_out(docs, client_pod, container, root, secret, root / "volumes")
            env = _environment(docs, container)
            env["BATCHINFER_REDIS_PASSWORD_FILE"] = _in_root(env["BATCHINFER_REDIS_PASSWORD_FILE"], root)
            settings = Settings.from_env(env)
            assert urlsplit(settings.broker_url).username == user and settings.namespace == namespace
            client = redis_client(settings.broker_url, settings.redis_tls, socket_timeout=10)
            assert client.ping() and client.llen(f"{namespace}:broker:batchinfer") == 0, name
            for refused in (("FLUSHALL",), ("GET", "elsewhere:jobs")):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.execute_command(*refused)
            if user == "reader":
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.set(f"{namespace}:jobs", "x")
    finally:
        stop_process(proc, 10)
