"""FwdLLM over the real RabbitMQ and Redis with the services as separate processes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import ServiceCluster

pytestmark = pytest.mark.integration

# Forward gradients on the classifier head of real MiniLM (1,925 parameters): a few rounds
# are enough to move accuracy well off the untrained model's.
FWD_SPEC: dict[str, Any] = {
    "name": "it-fwd",
    "model": "minilm-l6",
    "dataset": "bbc-news",
    "mode": "fwd",
    "partition": {"kind": "iid"},  # with label skew the round's client mix, not the estimate, sets the step
    "num_clients": 4,
    "clients_per_round": 2,
    "rounds": 4,
    "batch_size": 8,
    "max_length": 32,
    "eval_max_examples": 96,
    "seed": 3,
    "fwd": {
        "perturb": "head",
        "perturbations_per_task": 8,
        "candidates": 4,
        "discriminative": True,
        "variance_control": "adaptive",
        "lr": 0.5,
        "variance_threshold": 0.05,  # low: the first wave is never enough
        "max_perturbations_per_step": 32,
    },
}


def test_fwd_job_learns_and_variance_control_adds_work(cluster: ServiceCluster) -> None:
    job_id = cluster.submit(FWD_SPEC)
    job = cluster.wait(job_id, 900)
    assert job["state"] == "succeeded", job
    rounds = job["metrics"]
    untrained = rounds[0]["accuracy"]
    assert max(m["accuracy"] for m in rounds[1:]) > untrained + 0.1, [m["accuracy"] for m in rounds]
    steps = rounds[1:]
    # The threshold is below what 2 tasks x 8 perturbations reach: every step asked for more waves
    # before committing, up to the cap.
    assert all(m["waves"] > 1 for m in steps)
    assert all(16 < m["perturbations"] <= 32 for m in steps)
    assert all(m["variance"] > 0 for m in steps)
    # Seeds, not tensors: each upload is a few hundred bytes.
    assert all(m["bytes_up"] / m["updates"] < 1024 for m in steps)
    # Discriminative sampling had a previous gradient to align with from the second step on.
    assert all(m["cosine"] > 0 for m in steps[1:])
    metrics = cluster.metric(cluster.aggregator_metrics_port, "pwff_fwd_perturbations_per_step_count")
    assert metrics >= len(steps)
