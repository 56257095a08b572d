"""A bring-your-own model folder and data file, distributed over the real RabbitMQ and Redis.

The same job run embedded and by the services as OS processes ends with the same adapter; a
file with a class the job does not know is a 422 at submission.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from services.embedded import EmbeddedCluster
from shared.spec import parse_spec
from tests.harness import ServiceCluster
from tests.integration.test_distributed import adapter_tensors, max_abs_difference
from tests.test_byo import byo_spec, records, save_tiny_classifier

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def byo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("byo-it")
    model = save_tiny_classifier(root / "my-bert")
    notes = root / "notes.jsonl"
    notes.write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
    return byo_spec(model, {"path": str(notes)}).model_dump(mode="json")


def test_a_byo_job_gives_the_same_adapter_embedded_and_distributed(
    cluster: ServiceCluster, model_cache: Path, byo: dict[str, Any]
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (PWFF_TORCH_THREADS=1): the same reductions, bit for bit
    try:
        with EmbeddedCluster(model_cache) as embedded:
            job_id = embedded.scheduler.submit(parse_spec(byo))
            job = embedded.wait(job_id)
            archive = embedded.scheduler.model_archive(job_id)
    finally:
        torch.set_num_threads(threads)
    assert job["state"] == "succeeded", job.get("error")
    assert archive is not None
    distributed_job = cluster.wait(cluster.submit(byo), timeout_s=300)
    assert distributed_job["state"] == "succeeded", distributed_job.get("error")
    with cluster.api() as client:
        distributed = client.get(f"/v1/jobs/{distributed_job['id']}/models/global").content
    assert max_abs_difference(adapter_tensors(distributed), adapter_tensors(archive)) <= 1e-5
    with tarfile.open(fileobj=io.BytesIO(distributed), mode="r:gz") as tar:
        member = tar.extractfile("adapter_config.json")
        assert member is not None
        config = json.loads(member.read())
    # The adapter names its base as a user can load it: the model folder.
    assert config["base_model_name_or_path"] == str(Path(byo["model"]).resolve())


def test_a_label_outside_the_classes_is_a_422(cluster: ServiceCluster, byo: dict[str, Any]) -> None:
    spec = {**byo, "dataset": {**byo["dataset"], "labels": ["sport", "weather"]}}
    with cluster.api() as client:
        response = client.post("/v1/jobs", json=spec)
    assert response.status_code == httpx.codes.UNPROCESSABLE_ENTITY
    assert "label 'money' is not one of the classes ['sport', 'weather']" in response.json()["detail"][0]["msg"]
