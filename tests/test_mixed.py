"""`mode: auto`: clients whose device memory holds a backprop step train with backprop, the others forward."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.embedded import EmbeddedCluster
from shared.catalog import model_info
from shared.codec import decode_tensors
from shared.forward_grad import TRAJECTORY_MAGIC, TrajectoryStep, encode_trajectory
from shared.messages import InvalidMessage, UpdateReady, encode
from shared.modes.auto import backprop_fits
from shared.spec import JobSpec
from shared.state import Repositories
from shared.store.memory import MemoryStore
from tests.test_aggregator import World, make_world, received  # noqa: F401 (make_world is a fixture)

# tiny-bert at batch 4 x 32 tokens: a backprop step needs ~660 MB, a forward step ~417 MB (see the
# catalog); devices between 450 and 1,000 MB split the clients.
MIXED: dict[str, Any] = {
    "mode": "auto",
    "num_clients": 6,
    "clients_per_round": 6,
    "local_steps": 3,
    "devices": {"population": {"memory_mb_min": 450, "memory_mb_max": 1000}},
    "fwd": {
        "perturb": "head",
        "perturbations_per_local_step": 32,
        "max_perturbations_per_local_step": 32,
        "variance_control": "fixed",
        "discriminative": False,
        "local_lr": 0.5,
    },
}


class RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.uploads: dict[int, bytes] = {}

    def put(self, key: str, value: bytes, ttl_s: int | None = None) -> None:
        if ":update:" in key:
            self.uploads[int(key.split(":update:")[1].split(":")[0])] = bytes(value)
        super().put(key, value, ttl_s)


def test_the_memory_rule_splits_the_clients(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = tiny_spec(**MIXED)
    needed = model_info("tiny-bert").step_memory_mb(spec.batch_size * spec.max_length, backprop=True)
    assert 450 < needed < 1000
    fits = [backprop_fits(spec, client, 1) for client in range(spec.num_clients)]
    assert any(fits) and not all(fits), fits
    roomy = tiny_spec(**{**MIXED, "devices": {"population": {"memory_mb_min": 4000, "memory_mb_max": 4000}}})
    assert all(backprop_fits(roomy, client, 1) for client in range(spec.num_clients))


def test_a_mixed_job_trains_both_kinds_of_client_in_one_round(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path
) -> None:
    spec = tiny_spec(**MIXED, rounds=2)
    store = RecordingStore()
    with EmbeddedCluster(cache_dir, workers=2, store=store) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id)
        final = decode_tensors(Repositories(cluster.store).tensors.global_state(job_id, 2) or b"")
    assert job["state"] == "succeeded", job["error"]
    assert [len(m["clients"]) for m in job["metrics"][1:]] == [6, 6]
    for client, blob in store.uploads.items():
        forward = blob.startswith(TRAJECTORY_MAGIC)
        assert forward != backprop_fits(spec, client, 2), (client, blob[:4])
    assert any(not torch.equal(value, torch.zeros_like(value)) for value in final.values())


def test_a_client_that_fits_cannot_pass_off_a_trajectory(make_world: Callable[..., World]) -> None:  # noqa: F811
    world = make_world(**MIXED)
    client = next(c for c in world.clients if backprop_fits(world.spec, c, 1))
    steps = [TrajectoryStep(np.arange(4, dtype=np.uint32), np.ones(4, np.float16), 0.5)]
    blob = encode_trajectory(steps, [1.0])
    key = world.update_key(client)
    world.store.put(key, blob)
    message = UpdateReady(
        job_id=world.job_id, round=1, client=client, attempt=0, key=key, num_samples=10, train_loss=1.0,
        compute_s=0.1, upload_bytes=len(blob), perturbations=4, digest=hashlib.sha256(blob).hexdigest(),
    )  # fmt: skip
    world.store.put(world.meta_key(client), encode(message))
    before = received("invalid")
    with pytest.raises(InvalidMessage):
        world.aggregator.handle(encode(message))
    assert received("invalid") == before + 1
