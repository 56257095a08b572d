"""`mode: align` over the real RabbitMQ and Redis, the services as separate processes: the same job
embedded and distributed gives the same adapter, and each client's personal part moves between workers."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from services.embedded import EmbeddedCluster
from shared.spec import parse_spec
from tests.harness import ServiceCluster
from tests.integration.test_distributed import adapter_tensors, max_abs_difference

pytestmark = pytest.mark.integration

ALIGN_SPEC: dict[str, Any] = {
    "name": "it-align",
    "model": "tiny-llama",
    "dataset": "tweets-sentiment",
    "mode": "align",
    "num_clients": 4,
    "clients_per_round": 4,
    "rounds": 3,
    "local_steps": 2,
    "max_length": 64,
    "eval_max_examples": 16,
    "seed": 3,
    "optimizer": {"lr": 0.01},
    "personalization": {"preset": "pwff"},
    "align": {
        "rewards": [
            {"name": "concise", "kind": "conciseness", "target_words": 3},
            {"name": "relevance", "kind": "relevance"},
        ],
        "prompts_per_step": 2,
        "samples_per_prompt": 3,
        "max_new_tokens": 8,
        "eval_prompts": 4,
    },
}

START = re.compile(r"(worker@\S+) starting (\S+) round (\d+) client (\d+) wave 0 \(personal state: (\S+)\)")


def test_align_job_distributed_equals_embedded(cluster: ServiceCluster, model_cache: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run, for bit-equal reductions
    try:
        with EmbeddedCluster(model_cache) as embedded:
            job_id = embedded.scheduler.submit(parse_spec(ALIGN_SPEC))
            reference = embedded.wait(job_id)
            reference_archive = embedded.scheduler.model_archive(job_id)
    finally:
        torch.set_num_threads(threads)
    assert reference["state"] == "succeeded", reference["error"]
    assert reference_archive is not None

    job = cluster.wait(cluster.submit(ALIGN_SPEC), 900)
    assert job["state"] == "succeeded", job
    with cluster.api() as api:
        archive = api.get(f"/v1/jobs/{job['id']}/models/global").content
        answer = api.post(f"/v1/jobs/{job['id']}/generate", json={"prompt": "hello there", "client": 1})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "client-1" and answer.json()["round"] == 3
        not_causal = api.post(f"/v1/jobs/{job['id']}/generate", json={"prompt": "hi", "client": 9})
        assert not_causal.status_code == 422 and "client" in not_causal.text
    assert max_abs_difference(adapter_tensors(archive), adapter_tensors(reference_archive)) <= 1e-5

    # The figures each client reported: identical to the embedded run's, rewards of all three models.
    last, expected = job["metrics"][-1], reference["metrics"][-1]
    for client in range(4):
        got, want = last["per_client"][str(client)], expected["per_client"][client]
        assert got["personalized_weighted_reward"] == pytest.approx(want["personalized_weighted_reward"], abs=1e-6)
        for model in ("reference", "global", "personalized"):
            assert {f"{model}_reward_concise", f"{model}_reward_relevance", f"{model}_kl"} <= set(got)
        assert got["samples"] and set(got["samples"][0]) == {"prompt", "global", "personalized"}

    # Each client's next task started from the personal state its previous task left, on any worker.
    starts: dict[int, list[tuple[int, str, str]]] = defaultdict(list)
    for log in cluster.worker_logs:
        for match in START.finditer(log.read_text(errors="replace")):
            worker, logged_job, round_, client, personal = match.groups()
            if logged_job == job["id"]:
                starts[int(client)].append((int(round_), worker, personal))
    handoffs = 0
    for client, runs in starts.items():
        runs.sort()
        assert runs[0][2] == "initial"
        for (previous_round, previous_worker, _), (_, worker, personal) in itertools.pairwise(runs):
            assert personal == f"v{previous_round}.0", (client, runs)
            handoffs += worker != previous_worker
    assert handoffs > 0, "no client moved between workers; nothing was tested"
