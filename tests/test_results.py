"""The run folder's figure: what a user reads first after `pwff run`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.image

from services.results import plot_metrics


def _job(rounds: int, personalized: bool, costed: bool, forward: bool) -> dict[str, Any]:
    metrics: list[dict[str, Any]] = []
    for r in range(rounds + 1):
        entry: dict[str, Any] = {"round": r, "accuracy": 0.3 + 0.1 * r, "loss": 1.5 - 0.1 * r, "bytes_up": 1e5 * r}
        if r and costed:
            entry |= {"delay_s": 2.0 + r, "energy_j": 100.0 * r}
        if r and forward:
            entry |= {"perturbations": 256 * r, "variance": 0.9 / r, "cosine": 0.05}
        if r and personalized:
            per_client = {c: {"global_accuracy": 0.5, "personalized_accuracy": 0.6 + 0.05 * c} for c in range(3)}
            entry |= {
                "per_client": per_client,
                "client_mean_global_accuracy": 0.5,
                "client_mean_personalized_accuracy": 0.65,
            }
        metrics.append(entry)
    return {
        "id": "job-1",
        "state": "succeeded",
        "spec": {"model": "minilm-l6", "dataset": "bbc-news"},
        "metrics": metrics,
    }


def test_plain_job_gets_one_row_of_panels(tmp_path: Path) -> None:
    plot_metrics(_job(3, personalized=False, costed=False, forward=False), tmp_path / "m.png")
    assert matplotlib.image.imread(tmp_path / "m.png").shape[:2] == (400, 1400)


def test_personalized_costed_forward_job_adds_a_row_and_survives_json(tmp_path: Path) -> None:
    # Through the API per-client keys become strings; the figure reads either.
    job = json.loads(json.dumps(_job(3, personalized=True, costed=True, forward=True)))
    plot_metrics(job, tmp_path / "m.png")
    assert matplotlib.image.imread(tmp_path / "m.png").shape[:2] == (800, 1400)
    in_process = _job(2, personalized=True, costed=True, forward=False)
    plot_metrics(in_process, tmp_path / "n.png")
    assert matplotlib.image.imread(tmp_path / "n.png").shape[:2] == (800, 1400)
