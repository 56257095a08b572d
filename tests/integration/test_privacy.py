"""A DP-FedAvg job gives the same final adapter and the same epsilon distributed (separate processes over
RabbitMQ and Redis, two workers) as embedded, bit for bit: the noise is drawn from generators seeded by
the job seed and the round (client-side: and the client), never from process state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from shared import privacy
from shared.spec import parse_spec
from tests.harness import ServiceCluster
from tests.integration.test_codecs import _adapter, _embedded

pytestmark = pytest.mark.integration

SPEC: dict[str, Any] = {
    "model": "tiny-bert",
    "dataset": "bbc-news",
    "num_clients": 4,
    "clients_per_round": 3,
    "rounds": 3,
    "local_steps": 2,
    "batch_size": 4,
    "max_length": 32,
    "eval_max_examples": 32,
    "seed": 13,
    "aggregation": {"weighting": "uniform"},
}


@pytest.mark.parametrize("noise", ["server", "client"])
def test_dp_job_distributed_equals_embedded(cluster: ServiceCluster, model_cache: Path, noise: str) -> None:
    spec = {**SPEC, "name": f"it-dp-{noise}", "privacy": {"clip_norm": 0.05, "noise_multiplier": 1.1, "noise": noise}}
    embedded_job, embedded = _embedded(spec, model_cache)
    job_id = cluster.submit(spec)
    job = cluster.wait(job_id, 600)
    assert job["state"] == "succeeded", job
    distributed = _adapter(cluster.api().get(f"/v1/jobs/{job_id}/models/global").content)
    assert set(distributed) == set(embedded)
    for name, value in embedded.items():
        assert torch.equal(distributed[name], value), f"{noise}: {name} differs"
    expected = [privacy.epsilon(parse_spec(spec), r) for r in (1, 2, 3)]
    assert [m["dp_epsilon"] for m in job["metrics"][1:]] == expected
    assert [m["dp_epsilon"] for m in embedded_job["metrics"][1:]] == expected
    assert job["privacy"]["epsilon_spent"] == job["privacy"]["epsilon_total"] == expected[-1]
    # Epsilon reaches Prometheus too (the aggregator's gauge, per job; it lingers after the last round).
    text = httpx.get(f"http://127.0.0.1:{cluster.aggregator_metrics_port}/metrics", timeout=5).text
    series = [line for line in text.splitlines() if line.startswith(f'pwff_dp_epsilon{{job_id="{job_id}"}} ')]
    assert [float(line.rsplit(" ", 1)[1]) for line in series] == [expected[-1]]
