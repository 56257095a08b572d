"""PWFF over the real RabbitMQ and Redis with the services as separate processes."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from typing import Any

import pytest

from tests.harness import ServiceCluster

pytestmark = pytest.mark.integration

PWFF_SPEC: dict[str, Any] = {
    "name": "it-pwff",
    "model": "minilm-l6",
    "dataset": "bbc-news",
    "partition": {"kind": "dirichlet", "alpha": 0.3},
    "num_clients": 4,
    "clients_per_round": 4,
    "rounds": 6,
    "local_steps": 2,
    "batch_size": 4,
    "max_length": 32,
    "eval_max_examples": 32,
    "seed": 11,
    "personalization": {"preset": "pwff", "eval_examples_per_client": 16},
    "budget": {"kind": "deadline", "device_deadline_s": 5.0},
}

START = re.compile(r"(worker@\S+) starting (\S+) round (\d+) client (\d+) wave 0 \(personal state: (\S+)\)")


def test_pwff_job_hands_each_clients_personal_state_to_the_next_worker(cluster: ServiceCluster) -> None:
    job = cluster.wait(cluster.submit(PWFF_SPEC), 900)
    assert job["state"] == "succeeded", job

    # Which worker started which (round, client), with the personal state it was handed.
    starts: dict[int, list[tuple[int, str, str]]] = defaultdict(list)
    for log in cluster.worker_logs:
        for match in START.finditer(log.read_text(errors="replace")):
            worker, job_id, round_, client, personal = match.groups()
            if job_id == job["id"]:
                starts[int(client)].append((int(round_), worker, personal))
    handoffs = 0
    for client, runs in starts.items():
        runs.sort()
        assert runs[0][2] == "initial", f"client {client} started from someone's personal state"
        for (previous_round, previous_worker, _), (_, worker, personal) in itertools.pairwise(runs):
            # Every later task starts from the state this client's previous task left behind.
            assert personal == f"v{previous_round}.0", (client, runs)
            handoffs += worker != previous_worker
    assert handoffs > 0, "no client moved between workers; nothing was tested"

    # Every client reports its personalized model against the global one, and has it published.
    last = job["metrics"][-1]
    assert sorted(int(c) for c in last["per_client"]) == [0, 1, 2, 3]
    with cluster.api() as api:
        for client in range(4):
            assert api.get(f"/v1/jobs/{job['id']}/models/clients/{client}").status_code == 200
    # The wireless model priced every round, within the device deadline the budgets aimed at.
    for m in job["metrics"][1:]:
        assert m["delay_s"] > 0 and m["energy_j"] > 0
