"""The services as separate OS processes over the real RabbitMQ and Redis.

A job submitted over HTTP runs to `succeeded` and its global adapter equals the
embedded run's; a worker SIGKILLed mid-task changes nothing; a malformed task lands
in the dead-letter queue and the worker keeps going.
"""

from __future__ import annotations

import io
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from services.embedded import EmbeddedCluster
from shared.bus import Queues
from shared.bus.rabbitmq import RabbitBus
from shared.spec import parse_spec
from tests.harness import ServiceCluster

pytestmark = pytest.mark.integration

# Real MiniLM on real BBC News, kept small: 4 clients, 2 rounds of 4 local steps.
SPEC: dict[str, Any] = {
    "name": "it-bbc",
    "model": "minilm-l6",
    "dataset": "bbc-news",
    "num_clients": 4,
    "clients_per_round": 3,
    "rounds": 2,
    "local_steps": 4,
    "batch_size": 4,
    "max_length": 32,
    "eval_max_examples": 48,
    "seed": 7,
    "optimizer": {"lr": 0.003},
}


def adapter_tensors(archive: bytes) -> dict[str, torch.Tensor]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = tar.extractfile("adapter_model.safetensors")
        assert member is not None
        return safetensors.torch.load(member.read())


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def embedded_reference(model_cache: Path) -> dict[str, torch.Tensor]:
    # Bit-for-bit equality needs the same intra-op thread count as the workers (PWFF_TORCH_THREADS=1):
    # CPU kernels split their reductions by thread, and Adam turns those last-bit differences
    # in near-zero gradients into visible ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with EmbeddedCluster(model_cache) as cluster:
            job_id = cluster.scheduler.submit(parse_spec(SPEC))
            job = cluster.wait(job_id)
            assert job["state"] == "succeeded", job
            archive = cluster.scheduler.model_archive(job_id)
    finally:
        torch.set_num_threads(threads)
    assert archive is not None
    return adapter_tensors(archive)


def run_job(cluster: ServiceCluster, spec: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    job_id = cluster.submit(spec)
    return cluster.wait(job_id, timeout_s)


def test_malformed_task_is_dead_lettered_and_worker_keeps_going(cluster: ServiceCluster) -> None:
    bus = RabbitBus(cluster.settings.rabbitmq_url)
    dead = Queues.dead(cluster.queues.tasks)
    before = bus.depth(dead)
    bus.publish(cluster.queues.tasks, b"\x93not a task")
    bus.publish(cluster.queues.tasks, b"\x81\xa1v\x01")  # a msgpack map with a version and nothing else
    deadline = time.monotonic() + 60
    while bus.depth(dead) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert bus.depth(dead) == before + 2
    assert all(worker.poll() is None for worker in cluster.workers), "a worker died on a malformed message"
    counted = sum(cluster.metric(port, "pwff_messages_dead_lettered_total") for port in cluster.worker_metric_ports)
    assert counted == 2
    bus.close()
    # ...and the workers still train.
    job = run_job(cluster, {**SPEC, "rounds": 1, "name": "after-dead-letter"})
    assert job["state"] == "succeeded", job


def test_job_over_http_equals_embedded_run(
    cluster: ServiceCluster, embedded_reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    job = run_job(cluster, SPEC)
    assert job["state"] == "succeeded", job
    assert [m["round"] for m in job["metrics"]] == [0, 1, 2]
    assert all(m["accuracy"] >= 0 for m in job["metrics"])
    assert job["metrics"][-1]["bytes_up"] > 0
    archive = cluster.api().get(f"/v1/jobs/{job['id']}/models/global").content
    distributed = adapter_tensors(archive)
    assert max_abs_difference(distributed, embedded_reference) <= 1e-5

    # The CLI downloads the same folder layout `pwff run` writes.
    out = tmp_path / "download"
    cluster.cli("download", job["id"], "-o", str(out))
    assert (out / "global" / "adapter_config.json").exists()
    assert (out / "clients" / "0" / "adapter_model.safetensors").exists()
    assert (out / "metrics.png").stat().st_size > 0


def test_worker_killed_mid_task_changes_nothing(
    cluster: ServiceCluster, embedded_reference: dict[str, torch.Tensor]
) -> None:
    victim = cluster.workers[0]
    log = cluster.worker_logs[0]
    offset = log.stat().st_size
    job_id = cluster.submit(SPEC)
    deadline = time.monotonic() + 300
    killed_during: str | None = None
    while time.monotonic() < deadline and killed_during is None:
        fresh = log.read_text(errors="replace")[offset:]
        started = [line for line in fresh.splitlines() if " starting " in line]
        if started:
            victim.send_signal(signal.SIGKILL)
            killed_during = started[0]
        time.sleep(0.02)
    assert killed_during is not None, "the victim never started a task"
    victim.wait(timeout=30)
    after_kill = log.read_text(errors="replace")[offset:]
    task_words = killed_during.split(" starting ")[1]
    assert f"trained {task_words}" not in after_kill, "the task finished before the kill; nothing was tested"
    cluster.replace_worker(0)  # as Kubernetes would restart the pod

    job = cluster.wait(job_id, 600)
    assert job["state"] == "succeeded", job
    archive = cluster.api().get(f"/v1/jobs/{job_id}/models/global").content
    assert max_abs_difference(adapter_tensors(archive), embedded_reference) <= 1e-5


def test_api_rejects_bad_token_and_bad_spec(cluster: ServiceCluster) -> None:
    anonymous = httpx.get(f"{cluster.api_url}/v1/jobs", timeout=10)
    assert anonymous.status_code == 401
    bad = cluster.api().post("/v1/jobs", json={**SPEC, "num_clients": 0})
    assert bad.status_code == 422
    assert "num_clients" in bad.text
    assert httpx.get(f"{cluster.api_url}/readyz", timeout=10).status_code == 200
    metrics = httpx.get(f"{cluster.api_url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "pwff_jobs_submitted_total" in metrics.text
