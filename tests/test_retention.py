"""Job retention and purge against the real Redis: nothing of a job outlives its retention or a purge.

A tiny job runs through the real Scheduler, Aggregator and Worker (in threads, on the in-process bus)
over a RedisStore in a private namespace, so every key family a job writes is there to be removed.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.aggregator.aggregator import Aggregator
from services.scheduler.api import create_app
from services.scheduler.core import Scheduler
from services.worker.worker import Worker
from shared.bus.memory import MemoryBus
from shared.settings import Settings
from shared.spec import JobSpec
from shared.store import Keys
from shared.store.redis import RedisStore
from tests.harness import wait_until

TOKEN = "retention-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Cluster:
    def __init__(self, cache_dir: Path, retention_s: int, run: bool = True) -> None:
        self.namespace = f"ret-{uuid.uuid4().hex[:8]}"
        self.store = RedisStore(Settings().redis_url)
        self.redis = self.store.client
        self.bus = MemoryBus()
        self.scheduler = Scheduler(self.bus, self.store, self.namespace, tick_s=0.2, retention_s=retention_s)
        self.api = TestClient(create_app(self.scheduler, TOKEN))
        self.keys = Keys(self.namespace)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        loops: list[Callable[[threading.Event], None]] = [self.scheduler.run]
        if run:
            loops.append(Aggregator(self.bus, self.store, cache_dir, self.namespace).run)
            loops.append(Worker(self.bus, self.store, cache_dir, self.namespace).run)
        for loop in loops:
            thread = threading.Thread(target=loop, args=(self._stop,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def job_keys(self, job_id: str) -> list[str]:
        """Every key in Redis that names the job, wherever it is (a SCAN, not the prefix the code uses)."""
        return sorted(k.decode() for k in self.redis.scan_iter(match=f"*{job_id}*", count=1000))

    def submit(self, spec: dict[str, Any]) -> str:
        response = self.api.post("/v1/jobs", json=spec, headers=AUTH)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def wait(self, job_id: str, states: tuple[str, ...], timeout_s: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.api.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
            if job["state"] in states:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not in {states} after {timeout_s}s")

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self.store.delete_prefix(f"{self.namespace}:")
        self.store.close()


def _families(job_id: str, keys: list[str]) -> set[str]:
    """Key names with the job id, round numbers and client ids taken out: "job:*:round:*:plan", ..."""
    out = set()
    for key in keys:
        rest = key.split(f":job:{job_id}:", 1)[1]
        out.add(":".join("*" if re.fullmatch(r"\d+|client-\d+", part) else part for part in rest.split(":")))
    return out


@pytest.fixture
def spec(tiny_spec: Callable[..., JobSpec]) -> dict[str, Any]:
    # pwff keeps personal parts with each client and publishes every client's model at the end; error
    # feedback leaves client residuals: every key family a job writes.
    job = tiny_spec(num_clients=3, clients_per_round=2, rounds=2, local_steps=1, eval_max_examples=16)
    data = job.model_dump(mode="json")
    data["compression"] = {**data["compression"], "error_feedback": True, "topk": 0.5}
    data["personalization"] = {**data["personalization"], "preset": "pwff"}
    return data


@pytest.fixture
def finished(cache_dir: Path, spec: dict[str, Any]) -> Iterator[tuple[Cluster, str]]:
    cluster = Cluster(cache_dir, retention_s=0)
    try:
        job_id = cluster.submit(spec)
        assert cluster.wait(job_id, ("succeeded", "failed", "cancelled"))["state"] == "succeeded"
        yield cluster, job_id
    finally:
        cluster.close()


def test_purge_removes_every_key_of_a_finished_job(finished: tuple[Cluster, str]) -> None:
    cluster, job_id = finished
    # An adaptation's model too: POST /adapt stores it beside the job's.
    adapted = cluster.api.post(
        f"/v1/jobs/{job_id}/adapt",
        json={"examples": [{"text": "a match report", "label": 0}], "steps": 1},
        headers=AUTH,
    )
    assert adapted.status_code == 201, adapted.text
    before = cluster.job_keys(job_id)
    families = _families(job_id, before)
    for family in (
        "meta",
        "metrics",
        "round:*:plan",
        "round:*:committed",
        "round:*:merged",
        "global:*",
        "model:global",
        "model:*",  # client-<n>
        "client:*:personal:*:*",
        "client:*:personal-rounds",
        "client:*:residual:*:*",
        "client:*:residual-rounds",
        "round:*:client-metrics",
    ):
        assert family in families, (family, sorted(families))
    assert any(key.endswith(f"model:adapted-{adapted.json()['id']}") for key in before)
    assert all(cluster.redis.ttl(key) == -1 for key in before if ":meta" in key or ":model:" in key)  # retention 0

    response = cluster.api.delete(f"/v1/jobs/{job_id}", params={"purge": "true"}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "id": job_id,
        "purged": True,
        "cancelled": False,
        "previous_state": "succeeded",
        "keys_removed": len(before),
    }
    assert cluster.job_keys(job_id) == []
    assert not cluster.redis.sismember(cluster.keys.jobs, job_id)
    assert cluster.api.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 404
    assert job_id not in [job["id"] for job in cluster.api.get("/v1/jobs", headers=AUTH).json()]
    assert cluster.api.get(f"/v1/jobs/{job_id}/models/global", headers=AUTH).status_code == 404
    again = cluster.api.delete(f"/v1/jobs/{job_id}", params={"purge": "true"}, headers=AUTH)
    assert again.status_code == 404


def test_purge_cancels_a_running_job_first(cache_dir: Path, spec: dict[str, Any]) -> None:
    cluster = Cluster(cache_dir, retention_s=0)
    try:
        job_id = cluster.submit({**spec, "rounds": 50})
        wait_until(
            lambda: cluster.api.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["round"] >= 2, 300, "round 2 opened"
        )
        response = cluster.api.delete(f"/v1/jobs/{job_id}", params={"purge": "true"}, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["cancelled"] is True and body["previous_state"] == "running" and body["keys_removed"] > 0
        # A task a worker was training at that moment may still store its update; the next tick removes it.
        wait_until(lambda: cluster.job_keys(job_id) == [], 30, "no key of the purged job left")
        time.sleep(1.0)
        assert cluster.job_keys(job_id) == []
    finally:
        cluster.close()


def test_retention_expires_a_finished_jobs_keys(cache_dir: Path, spec: dict[str, Any]) -> None:
    cluster = Cluster(cache_dir, retention_s=2, run=False)  # no aggregator: the job stays queued until cancelled
    try:
        job_id = cluster.submit(spec)
        keys = cluster.job_keys(job_id)
        assert keys and all(cluster.redis.ttl(key) == -1 for key in keys)  # a live job keeps its keys
        assert cluster.api.delete(f"/v1/jobs/{job_id}", headers=AUTH).json()["state"] == "cancelled"
        ttls = [cluster.redis.ttl(key) for key in cluster.job_keys(job_id)]
        assert ttls and all(0 < ttl <= 2 for ttl in ttls), ttls
        # Without purge a DELETE of an ended job is still a 409, and the job is still readable until it expires.
        assert cluster.api.delete(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 409
        wait_until(lambda: cluster.job_keys(job_id) == [], 10, "the job's keys expired")
        wait_until(lambda: not cluster.redis.sismember(cluster.keys.jobs, job_id), 5, "the job left the set of jobs")
        assert cluster.api.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 404
    finally:
        cluster.close()


def test_retention_zero_keeps_a_job_and_purge_of_unknown_is_404(cache_dir: Path, spec: dict[str, Any]) -> None:
    cluster = Cluster(cache_dir, retention_s=0, run=False)
    try:
        job_id = cluster.submit(spec)
        assert cluster.api.delete(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 200
        assert all(cluster.redis.ttl(key) == -1 for key in cluster.job_keys(job_id))
        assert cluster.api.delete("/v1/jobs/no-such-job-1", params={"purge": "true"}, headers=AUTH).status_code == 404
        purged = cluster.api.delete(f"/v1/jobs/{job_id}", params={"purge": "true"}, headers=AUTH).json()
        assert purged["cancelled"] is False and purged["previous_state"] == "cancelled"
        assert cluster.job_keys(job_id) == []
    finally:
        cluster.close()


def test_job_retention_setting() -> None:
    assert Settings().job_retention_s == 7 * 24 * 3600
    assert Settings(job_retention_s=0).job_retention_s == 0
    with pytest.raises(ValueError):
        Settings(job_retention_s=-1)
