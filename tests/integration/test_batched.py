"""Batched tasks (`clients_per_task`) over the real RabbitMQ and Redis, the services as separate processes.

A FwdLLM FedSGD job of 24 tiny clients (one perturbation each) run with one task per client and with
batches of 8 or 12 commits the same global state bit for bit, and every update is merged exactly once;
a worker SIGKILLed in the middle of its batch leaves the batch to the other worker, which announces the
clients already stored again instead of training them twice.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from shared.codec import decode_tensors
from shared.state import Repositories
from shared.store.redis import RedisStore
from tests.harness import ServiceCluster

pytestmark = pytest.mark.integration

CLIENTS = 24
SPEC: dict[str, Any] = {
    "name": "it-batched",
    "model": "tiny-bert",
    "dataset": "bbc-news",
    "mode": "fwd",
    "num_clients": CLIENTS,
    "clients_per_round": CLIENTS,
    "rounds": 2,
    "batch_size": 16,
    "max_length": 64,
    "eval_max_examples": 16,
    "seed": 5,
    "round_deadline_s": 300,
    "fwd": {
        "regime": "fedsgd",
        "perturb": "head",
        "perturbations_per_task": 1,
        "candidates": 2,
        "variance_control": "fixed",
        "max_perturbations_per_step": 64,
        "lr": 0.5,
    },
}


class Batched:
    def __init__(self, cluster: ServiceCluster) -> None:
        self.cluster = cluster
        self.state = Repositories(RedisStore(cluster.settings.redis_url), cluster.namespace)

    def run(self, clients_per_task: int, name: str) -> tuple[str, dict[str, Any]]:
        job_id = self.cluster.submit({**SPEC, "name": name, "clients_per_task": clients_per_task})
        return job_id, self.cluster.wait(job_id, 420)

    def final_state(self, job_id: str) -> dict[str, torch.Tensor]:
        blob = self.state.tensors.global_state(job_id, SPEC["rounds"])
        assert blob is not None
        return decode_tensors(blob)

    def aggregator_outcome(self, outcome: str) -> float:
        """The aggregator's pwff_updates_received_total{outcome=...} (0 before its first such update)."""
        port = self.cluster.aggregator_metrics_port
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        pattern = rf'^pwff_updates_received_total\{{outcome="{outcome}"\}} (\S+)$'
        found = re.search(pattern, text, flags=re.MULTILINE)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def batched(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Batched]:
    logs = tmp_path_factory.mktemp("batched-logs")
    cluster = ServiceCluster(logs, model_cache, workers=2)
    try:
        yield Batched(cluster)
    finally:
        cluster.close()
        for log in sorted(logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {log.name} (last lines)\n" + "\n".join(tail))


@pytest.fixture(scope="module")
def reference(batched: Batched) -> dict[str, torch.Tensor]:
    """One task per client."""
    merged_before = batched.aggregator_outcome("merged")
    job_id, job = batched.run(1, "it-unbatched")
    assert job["state"] == "succeeded", job
    assert [m["updates"] for m in job["metrics"][1:]] == [CLIENTS, CLIENTS]
    assert batched.aggregator_outcome("merged") - merged_before == 2 * CLIENTS
    return batched.final_state(job_id)


def assert_bit_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"{len(different)} tensors differ from the unbatched run's, e.g. {different[:3]}"


def test_batches_of_8_commit_the_unbatched_state_and_merge_every_update_once(
    batched: Batched, reference: dict[str, torch.Tensor]
) -> None:
    outcomes = {outcome: batched.aggregator_outcome(outcome) for outcome in ("merged", "duplicate", "late")}
    job_id, job = batched.run(8, "it-batched-8")
    assert job["state"] == "succeeded", job
    assert [m["updates"] for m in job["metrics"][1:]] == [CLIENTS, CLIENTS]
    for round_ in (1, 2):
        merged = batched.state.rounds.merged(job_id, round_)
        assert sorted(merged) == [(client, 0) for client in range(CLIENTS)]
    assert batched.aggregator_outcome("merged") - outcomes["merged"] == 2 * CLIENTS
    assert batched.aggregator_outcome("duplicate") == outcomes["duplicate"]
    assert batched.aggregator_outcome("late") == outcomes["late"]
    assert_bit_equal(batched.final_state(job_id), reference)


def _batch_of(log: Path, job_id: str) -> int | None:
    """The first client of the last batch of `job_id` the worker's log says it started (None: none)."""
    starts = re.findall(rf"starting {re.escape(job_id)} round 1 client (\d+) wave 0", log.read_text(errors="replace"))
    return int(starts[-1]) // 12 * 12 if starts else None


def test_a_worker_killed_mid_batch_leaves_its_clients_to_the_other_once(
    batched: Batched, reference: dict[str, torch.Tensor]
) -> None:
    cluster = batched.cluster
    duplicates = batched.aggregator_outcome("duplicate")
    job_id = cluster.submit({**SPEC, "name": "it-batched-killed", "clients_per_task": 12})
    # Two batches of 12 (clients 0-11, 12-23), one per worker. Kill a worker once its batch has some of its
    # clients merged and some not: the clients it stored are announced again by the other worker.
    victim: int | None = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline:
        merged = {client for client, _ in batched.state.rounds.merged(job_id, 1)}
        for index, log in enumerate(cluster.worker_logs):
            first = _batch_of(log, job_id)
            if first is not None and 0 < len(merged & set(range(first, first + 12))) < 12:
                victim = index
                break
        time.sleep(0.005)
    assert victim is not None, f"no worker was seen mid-batch; see logs in {cluster.log_dir}"
    cluster.workers[victim].send_signal(signal.SIGKILL)
    cluster.workers[victim].wait(timeout=30)
    try:
        job = cluster.wait(job_id, 420)
        assert job["state"] == "succeeded", job
        assert [m["updates"] for m in job["metrics"][1:]] == [CLIENTS, CLIENTS]
        assert sorted(batched.state.rounds.merged(job_id, 1)) == [(client, 0) for client in range(CLIENTS)]
        # The killed worker's stored clients came again from the survivor, as duplicates, never merged twice.
        assert batched.aggregator_outcome("duplicate") > duplicates
        assert_bit_equal(batched.final_state(job_id), reference)
    finally:
        cluster.replace_worker(victim)
        cluster.wait_ready()
