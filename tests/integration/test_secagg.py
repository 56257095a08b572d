"""Secure aggregation over the real RabbitMQ and Redis, services as separate processes (two workers
running a round's tasks side by side): the job succeeds and its final adapter equals an unmasked
embedded run's, with int8-quantized uploads (masks over the quantized values' fixed-point integers).

At 62 bits the fixed-point rounding (~1e-18) is below float32's, so the rounds commit what the
unmasked run commits; at 32 bits each round differs by ~1e-9, which later rounds' AdamW steps
carry into ~3e-5 (bench/secagg.py measures both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness import ServiceCluster
from tests.integration.test_codecs import _adapter, _embedded

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {
    "name": "it-secagg",
    "model": "minilm-l6",
    "dataset": "bbc-news",
    "num_clients": 4,
    "clients_per_round": 3,
    "rounds": 2,
    "local_steps": 2,
    "batch_size": 4,
    "max_length": 32,
    "eval_max_examples": 32,
    "seed": 13,
    "optimizer": {"lr": 0.003},
    "compression": {"quantize": "int8", "download": "float32"},
}


def test_secure_job_over_rabbitmq_and_redis_equals_the_unmasked_run(cluster: ServiceCluster, model_cache: Path) -> None:
    _, plain = _embedded(SPEC, model_cache)
    job_id = cluster.submit({**SPEC, "secure_aggregation": {"enabled": True, "bits": 62}})
    job = cluster.wait(job_id)
    assert job["state"] == "succeeded", job.get("error")
    for round_view in job["metrics"][1:]:
        assert round_view["secagg_survivors"] == 3 and round_view["secagg_dropped"] == 0
        assert round_view["updates"] == 12  # advertise, share, mask, unmask
    with cluster.api() as client:
        response = client.get(f"/v1/jobs/{job_id}/models/global")
        response.raise_for_status()
    secure = _adapter(response.content)
    assert secure.keys() == plain.keys()
    assert max(float((secure[n] - plain[n]).abs().max()) for n in plain) < 1e-6
