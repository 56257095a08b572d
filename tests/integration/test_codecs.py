"""Each update codec gives the same final adapter distributed (separate processes over RabbitMQ and Redis)
as embedded, bit for bit: stochastic rounding draws from generators seeded by (job seed, round, client,
wave), and every worker rebuilds the committed state from the per-round download delta exactly as the
aggregator commits it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from services.embedded import EmbeddedCluster
from shared.spec import parse_spec
from tests.harness import ServiceCluster

pytestmark = pytest.mark.integration

# Real MiniLM on real BBC News, kept small (as in test_distributed.py), three rounds so that workers
# apply deltas to cached states, with a personal head so residuals and personal tensors travel apart.
SPEC: dict[str, Any] = {
    "name": "it-codec",
    "model": "minilm-l6",
    "dataset": "bbc-news",
    "num_clients": 4,
    "clients_per_round": 3,
    "rounds": 3,
    "local_steps": 3,
    "batch_size": 4,
    "max_length": 32,
    "eval_max_examples": 32,
    "seed": 11,
    "optimizer": {"lr": 0.003},
}

CODECS: dict[str, dict[str, Any]] = {
    "float32": {"dtype": "float32", "download": "float32"},
    "int8": {"quantize": "int8", "download": "int8"},
    "int4+ef": {"quantize": "int4", "error_feedback": True, "download": "int4"},
    "top0.1+int8+ef": {"topk": 0.1, "quantize": "int8", "error_feedback": True, "download": "int8"},
    "top0.05+bfloat16+ef": {"topk": 0.05, "dtype": "bfloat16", "error_feedback": True, "download": "bfloat16"},
}


def _spec(codec: str) -> dict[str, Any]:
    personal = {"personalization": {"preset": "head"}} if codec == "int4+ef" else {}
    return {**SPEC, "name": f"it-{codec.replace('+', '-')}", "compression": CODECS[codec], **personal}


def _adapter(archive: bytes) -> dict[str, torch.Tensor]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = tar.extractfile("adapter_model.safetensors")
        assert member is not None
        return safetensors.torch.load(member.read())


def _embedded(spec: dict[str, Any], cache: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the harness's workers (PWFF_TORCH_THREADS=1): same reductions, same bits
    try:
        with EmbeddedCluster(cache) as cluster:
            job_id = cluster.scheduler.submit(parse_spec(spec))
            job = cluster.wait(job_id)
            archive = cluster.scheduler.model_archive(job_id)
    finally:
        torch.set_num_threads(threads)
    assert job["state"] == "succeeded", job.get("error")
    assert archive is not None
    return job, _adapter(archive)


@pytest.mark.parametrize("codec", list(CODECS))
def test_distributed_equals_embedded(cluster: ServiceCluster, model_cache: Path, codec: str) -> None:
    spec = _spec(codec)
    embedded_job, embedded = _embedded(spec, model_cache)
    job_id = cluster.submit(spec)
    job = cluster.wait(job_id, 600)
    assert job["state"] == "succeeded", job
    distributed = _adapter(cluster.api().get(f"/v1/jobs/{job_id}/models/global").content)
    assert set(distributed) == set(embedded)
    for name, value in embedded.items():
        assert torch.equal(distributed[name], value), f"{codec}: {name} differs"
    # The same bytes went up and the same figures came out, round by round.
    keep = ("accuracy", "loss", "bytes_up", "download_delta_bytes", "train_loss")
    for ours, theirs in zip(job["metrics"], embedded_job["metrics"], strict=True):
        assert {k: ours.get(k) for k in keep} == {k: theirs.get(k) for k in keep}
