"""The Grafana dashboard against a live scrape: a real Prometheus (Debian's `prometheus`, its own config and
storage in a temp folder, 1 s scrapes) scrapes the three services as OS processes during small real jobs
of every kind the dashboard has panels for (backprop with simulated devices, fwd, align, a dead letter);
then every PromQL expression of every panel runs through Prometheus' HTTP API and must return data.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shared.bus import Queues
from shared.bus.rabbitmq import RabbitBus
from shared.metrics import PER_JOB
from tests.harness import REPO, ServiceCluster, free_port

pytestmark = pytest.mark.integration

DASHBOARD = REPO / "deploy/helm/pwff/files/dashboard.json"
SCRAPE_INTERVAL_S = 1
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval): 4 s at 1 s scrapes
# and 1 s steps; 5 s leaves room for one late scrape on loaded cores.
RATE_INTERVAL = "5s"
PER_JOB_METRICS = [metric._name for metric in PER_JOB]
LINGER_S = 3  # finished jobs' series stay this long (PWFF_METRICS_JOB_LINGER_S), then go

BASE: dict[str, Any] = {
    "model": "tiny-bert",
    "dataset": "bbc-news",
    "num_clients": 3,
    "clients_per_round": 2,
    "rounds": 2,
    "local_steps": 2,
    "batch_size": 4,
    "max_length": 32,
    "eval_max_examples": 16,
    "lora": {"r": 4, "alpha": 8},
    "seed": 7,
}
JOBS: dict[str, dict[str, Any]] = {
    # Devices are always simulated: their delay and energy panels fill from any job.
    # Client-level DP on it fills the privacy panel (epsilon per job); DP-FedAvg needs uniform weights.
    "backprop": {
        **BASE,
        "name": "scrape-backprop",
        "aggregation": {"weighting": "uniform"},
        "privacy": {"clip_norm": 1.0, "noise_multiplier": 0.5},
    },
    "fwd": {
        **BASE,
        "name": "scrape-fwd",
        "mode": "fwd",
        "fwd": {"perturb": "head", "perturbations_per_task": 8, "max_perturbations_per_step": 8},
    },
    "align": {
        "name": "scrape-align",
        "model": "tiny-llama",
        "dataset": "tweets-sentiment",
        "mode": "align",
        "num_clients": 2,
        "clients_per_round": 2,
        "rounds": 1,
        "local_steps": 1,
        "max_length": 32,
        "eval_max_examples": 8,
        "seed": 3,
        "personalization": {"preset": "pwff"},
        "align": {
            "rewards": [
                {"name": "concise", "kind": "conciseness", "target_words": 3},
                {"name": "short", "kind": "conciseness", "target_words": 1},
            ],
            "prompts_per_step": 2,
            "samples_per_prompt": 2,
            "max_new_tokens": 4,
            "eval_prompts": 2,
        },
    },
}


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=30)
        assert response.status_code == 200, (path, params, response.text)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def targets_up(self) -> dict[str, str]:
        active = self.get("/api/v1/targets")["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in active}


def start_prometheus(folder: Path, cluster: ServiceCluster) -> Prometheus:
    binary = shutil.which("prometheus")
    assert binary is not None, "prometheus is not installed: run scripts/ensure-system-packages.sh"
    # As the chart's ServiceMonitor (or pod annotations) would: one scrape job per service, the pods'
    # Kubernetes namespace as a target label (the dashboard's $namespace variable selects on it).
    targets = {
        "pwff-scheduler": [cluster.api_port],
        "pwff-aggregator": [cluster.aggregator_metrics_port],
        "pwff-worker": cluster.worker_metric_ports,
    }
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s"},
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{p}" for p in ports], "labels": {"namespace": cluster.namespace}}
                ],
            }
            for job, ports in targets.items()
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("ab")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, (folder / "prometheus.log").read_text(errors="replace")[-3000:]
        try:
            if httpx.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200:
                return prometheus
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise TimeoutError("prometheus did not become ready in 60 s")


@dataclass
class Scrape:
    prometheus: Prometheus
    cluster: ServiceCluster
    jobs: dict[str, dict[str, Any]]
    start: float
    end: float


@pytest.fixture(scope="module")
def scrape(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[Scrape]:
    monkeypatch_module.setenv("PWFF_METRICS_JOB_LINGER_S", str(LINGER_S))
    folder = tmp_path_factory.mktemp("prometheus")
    cluster = ServiceCluster(tmp_path_factory.mktemp("scrape-logs"), model_cache, workers=1)
    prometheus: Prometheus | None = None
    try:
        prometheus = start_prometheus(folder, cluster)
        start = time.time()
        # Every service scraped at least once before anything happens: the zero before each first increment.
        deadline = time.monotonic() + 60
        while set(prometheus.targets_up().values()) != {"up"} or len(prometheus.targets_up()) != 3:
            assert time.monotonic() < deadline, prometheus.targets_up()
            time.sleep(0.5)
        time.sleep(2 * SCRAPE_INTERVAL_S)

        bus = RabbitBus(cluster.settings.rabbitmq_url)
        bus.publish(cluster.queues.tasks, b"\x93not a task")  # a dead letter for the dead-letter panels
        ids = {kind: cluster.submit(spec) for kind, spec in JOBS.items()}  # at once: one worker takes turns
        jobs = {kind: cluster.wait(job_id, 600) for kind, job_id in ids.items()}
        dead = bus.depth(Queues.dead(cluster.queues.tasks))
        bus.close()
        for kind, job in jobs.items():
            assert job["state"] == "succeeded", (kind, job)
        assert dead == 1
        # Finished jobs' series go after the linger; the next scrape no longer has them.
        time.sleep(LINGER_S + 3 * SCRAPE_INTERVAL_S)
        yield Scrape(prometheus, cluster, jobs, start, time.time())
    finally:
        if prometheus is not None:
            prometheus.process.terminate()
            prometheus.process.wait(timeout=30)
        cluster.close()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def dashboard_targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    panels += [sub for p in board["panels"] if p["type"] == "row" for sub in p.get("panels", [])]
    return [(panel, target) for panel in panels for target in panel["targets"]]


def substitute(expr: str, namespace: str, range_s: int, step_s: int) -> str:
    """Grafana's template variables, as Grafana would fill them for this time range and this namespace."""
    assert re.fullmatch(r"[\w-]+", namespace), namespace  # nothing a regex or a PromQL string would escape
    values = {
        "namespace": namespace,
        "__rate_interval": RATE_INTERVAL,
        "__interval": f"{step_s}s",
        "__range": f"{range_s}s",
    }
    # $1, $2: label_replace's capture groups, not variables.
    out = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: values[m.group(1)], expr)
    assert not re.search(r"\$[A-Za-z_{]", out), out
    return out


def test_every_dashboard_panel_has_data_from_the_live_scrape(scrape: Scrape) -> None:
    namespace = scrape.cluster.namespace
    # The dashboard's $namespace variable: label_values(pwff_jobs_running, namespace).
    values = scrape.prometheus.get("/api/v1/label/namespace/values", **{"match[]": "pwff_jobs_running"})
    assert namespace in values

    job_ids = {job["id"] for job in scrape.jobs.values()}
    start, end = math.floor(scrape.start), math.ceil(scrape.end)
    empty: list[str] = []
    panels: dict[int, list[dict[str, Any]]] = {}
    targets = dashboard_targets()
    assert len({panel["id"] for panel, _ in targets}) >= 20
    for panel, target in targets:
        query = substitute(target["expr"], namespace, end - start, 1)
        # Every target through /api/v1/query at each second of the run (a range query is the same evaluation).
        data = scrape.prometheus.get("/api/v1/query_range", query=query, start=start, end=end, step=1)
        assert data["resultType"] == "matrix", query
        series = data["result"]
        panels.setdefault(panel["id"], []).extend(series)
        legend_labels = re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", ""))
        for one in series:
            for label in legend_labels:
                # A legend label missing from the series is a panel grouped by the wrong label.
                assert one["metric"].get(label), (panel["title"], query, one["metric"])
            if any(metric in query for metric in PER_JOB_METRICS):
                # Per-job panels show pwff's jobs, never the scrape job or one line for all jobs.
                assert one["metric"].get("job_id") in job_ids, (panel["title"], query, one["metric"])
    for panel, _ in targets:
        series = panels[panel["id"]]
        figures = [float(v) for one in series for _, v in one["values"]]
        if not any(math.isfinite(f) and f != 0 for f in figures):
            empty.append(f"{panel['id']} {panel['title']}: {len(series)} series, no non-zero value")
    assert not sorted(set(empty)), sorted(set(empty))


def test_per_job_panels_are_grouped_by_the_pwff_job(scrape: Scrape) -> None:
    fwd_id = scrape.jobs["fwd"]["id"]
    namespace = scrape.cluster.namespace
    data = scrape.prometheus.get(
        "/api/v1/query_range",
        query=f'max by (job_id) (pwff_fwd_variance{{namespace=~"{namespace}"}})',
        start=math.floor(scrape.start),
        end=math.ceil(scrape.end),
        step=1,
    )
    assert [one["metric"] for one in data["result"]] == [{"job_id": fwd_id}]
    # The scrape's own `job` label stays the scrape job: nothing of pwff's was renamed to exported_job.
    exported = scrape.prometheus.get("/api/v1/query", query='count({__name__=~"pwff_.+", exported_job!=""})')
    assert exported["result"] == []
    scrape_jobs = scrape.prometheus.get("/api/v1/label/job/values", **{"match[]": "pwff_global_accuracy"})
    assert scrape_jobs == ["pwff-aggregator"]


def test_finished_jobs_leave_no_per_job_series(scrape: Scrape) -> None:
    for kind, job in scrape.jobs.items():
        now = scrape.prometheus.get("/api/v1/query", query=f'{{job_id="{job["id"]}"}}')
        assert now["result"] == [], (kind, now["result"])
        # ...but they were there while the job ran.
        before = scrape.prometheus.get(
            "/api/v1/query", query=f'count(last_over_time({{job_id="{job["id"]}"}}[10m]))', time=scrape.end
        )
        assert before["result"], kind


def test_dead_letter_counts_from_zero(scrape: Scrape) -> None:
    """The worker's counter for its queue was scraped at 0 before the dead letter, so increase() sees it."""
    queue = scrape.cluster.queues.tasks
    window = math.ceil(scrape.end - scrape.start)
    data = scrape.prometheus.get(
        "/api/v1/query",
        query=f'increase(pwff_messages_dead_lettered_total{{queue="{queue}"}}[{window}s])',
        time=scrape.end,
    )
    # Every service starts the counters of all its namespace's queues; only the worker consumes tasks.
    by_job = {one["metric"]["job"]: float(one["value"][1]) for one in data["result"]}
    assert set(by_job) == {"pwff-scheduler", "pwff-aggregator", "pwff-worker"}, by_job
    assert by_job["pwff-worker"] == pytest.approx(1.0, abs=0.35), by_job  # increase() extrapolates a little
    assert by_job["pwff-scheduler"] == by_job["pwff-aggregator"] == 0.0
