"""`mode: auto` over the real RabbitMQ and Redis: a mixed job gives the embedded run's adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.embedded import EmbeddedCluster
from shared.modes.auto import backprop_fits
from shared.spec import parse_spec
from tests.harness import ServiceCluster
from tests.integration.test_distributed import adapter_tensors, max_abs_difference

pytestmark = pytest.mark.integration

# Real MiniLM: a backprop step at batch 4 x 32 needs ~534 MB by the catalog, a forward step ~493 MB;
# devices of 500-600 MB split the clients.
MIXED_SPEC: dict[str, Any] = {
    "name": "it-mixed",
    "model": "minilm-l6",
    "dataset": "bbc-news",
    "mode": "auto",
    "num_clients": 4,
    "clients_per_round": 4,
    "rounds": 2,
    "local_steps": 3,
    "batch_size": 4,
    "max_length": 32,
    "eval_max_examples": 48,
    "seed": 5,
    "optimizer": {"lr": 0.003},
    "devices": {"population": {"memory_mb_min": 500, "memory_mb_max": 600}},
    "fwd": {
        "perturb": "head",
        "perturbations_per_local_step": 16,
        "max_perturbations_per_local_step": 16,
        "variance_control": "fixed",
        "discriminative": False,
        "local_lr": 0.5,
    },
}


def test_mixed_job_distributed_equals_embedded(cluster: ServiceCluster, model_cache: Path) -> None:
    spec = parse_spec(MIXED_SPEC)
    kinds = {backprop_fits(spec, client, round_) for client in range(4) for round_ in (1, 2)}
    assert kinds == {True, False}, "the devices must split into both kinds of client"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run, for bit-equal reductions
    try:
        with EmbeddedCluster(model_cache) as embedded:
            job_id = embedded.scheduler.submit(spec)
            reference = embedded.wait(job_id)
            reference_archive = embedded.scheduler.model_archive(job_id)
    finally:
        torch.set_num_threads(threads)
    assert reference["state"] == "succeeded", reference["error"]
    assert reference_archive is not None

    job = cluster.wait(cluster.submit(MIXED_SPEC), 600)
    assert job["state"] == "succeeded", job
    archive = cluster.api().get(f"/v1/jobs/{job['id']}/models/global").content
    assert max_abs_difference(adapter_tensors(archive), adapter_tensors(reference_archive)) <= 1e-5
    assert [m["accuracy"] for m in job["metrics"]] == pytest.approx([m["accuracy"] for m in reference["metrics"]])
