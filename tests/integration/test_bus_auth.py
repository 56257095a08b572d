"""A rogue publisher on the real RabbitMQ (and a writer on the real Redis) against the service processes.

It can reach the broker and the store but not PWFF_BUS_SECRET. Its forged update (a well-shaped delta
stored under a sampled client's key, announced with num_samples 100000, unsealed or sealed with another
secret) and its forged JobFailed events are dead-lettered and counted by reason; the job still succeeds
from the real updates, and nothing of the forged delta reaches the global model.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch

from shared.bus import Queues
from shared.bus.rabbitmq import RabbitBus
from shared.codec import decode_tensors, encode_tensors
from shared.messages import JobFailed, UpdateReady, encode
from shared.signing import BusAuth
from shared.store import Keys
from shared.store.redis import RedisStore
from tests.harness import ServiceCluster, wait_until

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {
    "name": "it-forged",
    "model": "tiny-bert",
    "dataset": "bbc-news",
    "num_clients": 4,
    "clients_per_round": 2,
    "rounds": 2,
    "local_steps": 2,
    "batch_size": 4,
    "max_length": 32,
    "eval_max_examples": 16,
    "seed": 3,
}


def rejected(cluster: ServiceCluster, port: int | None, reason: str) -> float:
    """pwff_messages_rejected_total{reason} of the aggregator (its metrics port) or the scheduler (None: the API)."""
    import httpx

    url = f"{cluster.api_url}/metrics" if port is None else f"http://127.0.0.1:{port}/metrics"
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line.startswith(f'pwff_messages_rejected_total{{reason="{reason}"}} '):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no pwff_messages_rejected_total for {reason} at {url}")


def test_forged_updates_and_job_failed_are_dead_lettered_and_counted(cluster: ServiceCluster) -> None:
    keys = Keys(cluster.namespace)
    store = RedisStore(cluster.settings.redis_url)
    bus = RabbitBus(cluster.settings.rabbitmq_url)
    rogue = BusAuth.from_secret("not-the-deployment-secret")
    aggregator_port = cluster.aggregator_metrics_port
    reasons = ("missing_tag", "bad_tag")
    before = {
        "aggregator": {r: rejected(cluster, aggregator_port, r) for r in reasons},
        "scheduler": {r: rejected(cluster, None, r) for r in reasons},
        "aggregate.dead": bus.depth(Queues.dead(cluster.queues.aggregate)),
        "events.dead": bus.depth(Queues.dead(cluster.queues.events)),
    }
    try:
        job_id = cluster.submit(SPEC)
        plan_key = keys.round_plan(job_id, 1)
        wait_until(lambda: store.hash_get(plan_key, "clients") is not None, 120, "round 1 to open")
        raw_clients = store.hash_get(plan_key, "clients")
        assert raw_clients is not None
        client = int(raw_clients.strip("[]").split(",")[0])
        initial_blob = store.get(keys.global_state(job_id, 0))
        assert initial_blob is not None
        initial = decode_tensors(initial_blob)
        forged = encode_tensors({name: torch.full_like(value, 1000.0) for name, value in initial.items()}, "float32")
        key = keys.update(job_id, round_=1, client=client, wave=0, attempt=0)
        store.put(key, forged)
        announce = UpdateReady(
            job_id=job_id, round=1, client=client, attempt=0, key=key, num_samples=100_000, train_loss=0.0,
            compute_s=0.0, upload_bytes=len(forged), digest=hashlib.sha256(forged).hexdigest(),
        )  # fmt: skip
        bus.publish(cluster.queues.aggregate, encode(announce))  # no MAC
        bus.publish(cluster.queues.aggregate, rogue.seal(announce))  # another secret's MAC
        failed = JobFailed(job_id=job_id, error="forged by a rogue publisher")
        bus.publish(cluster.queues.events, encode(failed))
        bus.publish(cluster.queues.events, rogue.seal(failed))

        job = cluster.wait(job_id, timeout_s=600)
        assert job["state"] == "succeeded", job
        assert job["error"] is None
        # Every round merged the real updates only: as many as clients sampled.
        assert [entry["updates"] for entry in job["metrics"][1:]] == [2.0, 2.0]
        final_blob = store.get(keys.global_state(job_id, 2))
        assert final_blob is not None
        final = decode_tensors(final_blob)
        assert max(float((final[name] - initial[name]).abs().max()) for name in initial) < 10.0

        def counted() -> bool:
            return all(
                rejected(cluster, aggregator_port, r) == before["aggregator"][r] + 1
                and rejected(cluster, None, r) == before["scheduler"][r] + 1
                for r in reasons
            )

        wait_until(counted, 30, "the rejections to be counted")
        assert bus.depth(Queues.dead(cluster.queues.aggregate)) == before["aggregate.dead"] + 2
        assert bus.depth(Queues.dead(cluster.queues.events)) == before["events.dead"] + 2
        assert all(process.poll() is None for process in [cluster.scheduler, cluster.aggregator, *cluster.workers])
    finally:
        bus.close()
        store.close()
