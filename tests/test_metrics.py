"""Metric definitions: labelled counters start at 0, per-job series carry `job_id` and go when a job ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.embedded import EmbeddedCluster
from shared.bus import Queues
from shared.metrics import GLOBAL_ACCURACY, PER_JOB, dead_letter_counter, forget_job
from shared.spec import JobSpec


def _job_series(job_id: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (sample.name, sample.labels)
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.labels.get("job_id") == job_id
    ]


def test_dead_letter_counters_start_at_zero_for_every_queue_of_the_namespace() -> None:
    hook = dead_letter_counter("metrics-test")
    for queue in Queues("metrics-test").all:
        assert REGISTRY.get_sample_value("pwff_messages_dead_lettered_total", {"queue": queue}) == 0.0
    hook("metrics-test.tasks", "bad message")
    assert REGISTRY.get_sample_value("pwff_messages_dead_lettered_total", {"queue": "metrics-test.tasks"}) == 1.0


def test_final_states_and_outcomes_are_exported_before_the_first_increment() -> None:
    for state in ("succeeded", "failed", "cancelled"):
        assert REGISTRY.get_sample_value("pwff_jobs_finished_total", {"state": state}) is not None
    for outcome in ("done", "stale", "duplicate", "failed"):
        assert REGISTRY.get_sample_value("pwff_tasks_processed_total", {"outcome": outcome}) is not None
    for outcome in ("merged", "duplicate", "late", "invalid"):
        assert REGISTRY.get_sample_value("pwff_updates_received_total", {"outcome": outcome}) is not None


def test_per_job_metrics_label_the_job_job_id_never_job() -> None:
    # Prometheus renames a target's `job` label to `exported_job` (its own `job` is the scrape job).
    for metric in PER_JOB:
        assert "job_id" in metric._labelnames and "job" not in metric._labelnames


def test_forget_job_removes_every_series_of_the_job_after_the_linger() -> None:
    GLOBAL_ACCURACY.labels(job_id="gone").set(0.5)
    GLOBAL_ACCURACY.labels(job_id="kept").set(0.7)
    for metric in PER_JOB[2:]:
        labels = {name: "gone" if name == "job_id" else "x" for name in metric._labelnames}
        metric.labels(**labels).set(1.0)
    assert len(_job_series("gone")) == len(PER_JOB) - 1
    forget_job("gone", linger_s=0.3)
    assert len(_job_series("gone")) == len(PER_JOB) - 1, "removed before the linger"
    deadline = time.monotonic() + 10
    while _job_series("gone") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _job_series("gone") == []
    assert REGISTRY.get_sample_value("pwff_global_accuracy", {"job_id": "kept"}) == 0.7
    forget_job("gone", linger_s=0)  # again, and for a job this registry never had: harmless
    forget_job("never-seen", linger_s=0)


@pytest.mark.parametrize("mode", ["backprop", "fwd"])
def test_a_finished_job_leaves_no_series_behind(
    mode: str, tiny_spec: Callable[..., JobSpec], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The services call `forget_job` where a job ends (the aggregator's last commit, the scheduler's finish)."""
    monkeypatch.setenv("PWFF_METRICS_JOB_LINGER_S", "0")
    overrides: dict[str, Any] = {"mode": mode, "rounds": 3}
    if mode == "fwd":
        overrides["fwd"] = {"perturb": "head", "perturbations_per_task": 8, "max_perturbations_per_step": 8}
    seen: set[str] = set()
    with EmbeddedCluster(cache_dir) as cluster:
        job_id = cluster.scheduler.submit(tiny_spec(**overrides))

        def during(view: dict[str, Any]) -> None:
            if view["state"] == "running":
                seen.update(name for name, _ in _job_series(job_id))

        job = cluster.wait(job_id, on_update=during, poll_s=0.02)
    assert job["state"] == "succeeded", job
    expected = {"pwff_global_accuracy", "pwff_global_loss"}
    if mode == "fwd":
        expected |= {"pwff_fwd_variance", "pwff_fwd_direction_cosine"}
    assert expected <= seen, seen
    assert _job_series(job_id) == []
