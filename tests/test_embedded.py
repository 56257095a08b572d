"""All three services in one process on a tiny-bert job: end to end, deterministic, PEFT-loadable."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from peft import PeftModel
from prometheus_client import REGISTRY

from services.embedded import EmbeddedCluster
from services.scheduler.core import sample_clients
from shared import data
from shared.adapters import build_peft_model
from shared.batches import collate
from shared.bus import Queues
from shared.codec import decode_tensors
from shared.evaluation import evaluation_subset, predict
from shared.models import (
    extract_archive,
    initial_state,
    load_base_model,
    load_tokenizer,
    load_trainable_state,
    peft_folder_archive,
)
from shared.seeding import derive_seed
from shared.spec import JobSpec
from shared.store import Keys

DEAD_TASKS = {"queue": Queues().tasks}


@dataclass
class Run:
    spec: JobSpec
    job: dict[str, Any]
    archive: bytes
    final_state: dict[str, torch.Tensor]
    dead_tasks: int
    dead_lettered: float
    views: list[dict[str, Any]]


def run_job(spec: JobSpec, cache_dir: Path, workers: int, poison: bytes | None = None) -> Run:
    views: list[dict[str, Any]] = []
    before = REGISTRY.get_sample_value("pwff_messages_dead_lettered_total", DEAD_TASKS) or 0.0
    with EmbeddedCluster(cache_dir, workers=workers) as cluster:
        if poison is not None:
            cluster.bus.publish(Queues().tasks, poison)
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, on_update=views.append, poll_s=0.05)
        archive = cluster.scheduler.model_archive(job_id)
        blob = cluster.store.get(Keys().global_state(job_id, spec.rounds))
        dead = cluster.bus.depth(Queues.dead(Queues().tasks))
    assert archive is not None and blob is not None
    after = REGISTRY.get_sample_value("pwff_messages_dead_lettered_total", DEAD_TASKS) or 0.0
    return Run(spec, job, archive, decode_tensors(blob), dead, after - before, views)


@pytest.fixture(scope="module")
def spec(tiny_spec: Callable[..., JobSpec]) -> JobSpec:
    return tiny_spec(num_clients=4, clients_per_round=3, rounds=2, local_steps=2, eval_max_examples=32)


@pytest.fixture(scope="module")
def first(spec: JobSpec, cache_dir: Path) -> Run:
    """One worker, with a malformed message waiting on the task queue."""
    return run_job(spec, cache_dir, workers=1, poison=b"\x93not a task")


@pytest.fixture(scope="module")
def second(spec: JobSpec, cache_dir: Path) -> Run:
    """The same spec again, on a fresh cluster."""
    return run_job(spec, cache_dir, workers=1)


@pytest.fixture(scope="module")
def parallel(spec: JobSpec, cache_dir: Path) -> Run:
    """The same spec on two worker threads."""
    return run_job(spec, cache_dir, workers=2)


def adapter_tensors(archive: bytes, folder: Path) -> dict[str, torch.Tensor]:
    extract_archive(archive, folder)
    return safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))


def test_job_succeeds_with_metrics_for_every_round(first: Run) -> None:
    job = first.job
    assert job["state"] == "succeeded", job["error"]
    assert job["error"] is None and job["round"] == 2
    assert [m["round"] for m in job["metrics"]] == [0, 1, 2]
    for entry in job["metrics"]:
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["loss"] > 0 and torch.isfinite(torch.tensor(entry["loss"]))
    for entry in job["metrics"][1:]:
        assert entry["bytes_up"] > 0 and entry["bytes_down"] > 0
        assert entry["train_loss"] > 0
        assert entry["duration_s"] >= 0


def test_job_view_lists_each_rounds_clients(first: Run) -> None:
    """`clients` in a round's view is the list of merged client ids (what `pwff status` takes len() of).

    Fails until Scheduler.get_job stops letting the aggregator's float metric `clients` overwrite the list.
    """
    rounds = first.job["metrics"]
    assert rounds[0]["clients"] == []
    for round_, entry in enumerate(rounds[1:], start=1):
        assert entry["clients"] == sample_clients(first.spec, round_)


def test_progress_is_reported_as_it_happens(first: Run) -> None:
    states = [view["state"] for view in first.views]
    assert states[-1] == "succeeded"
    assert "running" in states
    assert [len(view["metrics"]) for view in first.views] == sorted(len(view["metrics"]) for view in first.views)


def test_training_moves_the_global_model(first: Run, spec: JobSpec, cache_dir: Path) -> None:
    start = initial_state(build_peft_model(spec, cache_dir), derive_seed("init", spec.seed))
    assert set(start) == set(first.final_state)
    assert any(not torch.equal(start[name], value) for name, value in first.final_state.items())
    assert all(bool(torch.isfinite(value).all()) for value in first.final_state.values())


def test_malformed_task_is_dead_lettered_and_the_job_still_succeeds(first: Run) -> None:
    assert first.dead_tasks == 1
    assert first.dead_lettered == 1.0
    assert first.job["state"] == "succeeded"


def test_same_spec_gives_bit_identical_adapters(first: Run, second: Run, tmp_path: Path) -> None:
    assert second.job["state"] == "succeeded"
    one = adapter_tensors(first.archive, tmp_path / "one")
    two = adapter_tensors(second.archive, tmp_path / "two")
    assert one and set(one) == set(two)
    for name in one:
        assert torch.equal(one[name], two[name]), name
    for name, value in first.final_state.items():
        assert torch.equal(value, second.final_state[name]), name
    assert _figures(first) == _figures(second)


def test_worker_count_does_not_change_the_result(first: Run, parallel: Run) -> None:
    """Two worker threads in one process must train exactly what one worker does.

    Fails until model construction (torch.manual_seed + random init in load_base_model, peft's LoRA init)
    and training (torch.manual_seed + dropout in train_backprop) stop racing on torch's global RNG.
    """
    assert parallel.job["state"] == "succeeded"
    for name, value in first.final_state.items():
        assert torch.equal(value, parallel.final_state[name]), name
    assert _figures(first) == _figures(parallel)


def _figures(run: Run) -> list[dict[str, Any]]:
    """Per-round figures without wall-clock timings."""
    timings = {"eval_s", "aggregate_s", "compute_s_max", "compute_s_sum", "duration_s"}
    return [{k: v for k, v in m.items() if k not in timings} for m in run.job["metrics"]]


def test_published_archive_loads_with_peft(first: Run, spec: JobSpec, cache_dir: Path, tmp_path: Path) -> None:
    folder = extract_archive(first.archive, tmp_path / "global")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["r"] == spec.lora.r and config["lora_alpha"] == spec.lora.alpha

    num_labels = data.info(spec.dataset).num_labels
    loaded = PeftModel.from_pretrained(load_base_model("tiny-bert", num_labels, cache_dir), str(folder))
    loaded.eval()

    ours = build_peft_model(spec, cache_dir)
    load_trainable_state(ours, first.final_state)
    ours.eval()

    tokenizer = load_tokenizer("tiny-bert", cache_dir)
    examples = evaluation_subset(data.load(spec.dataset, "test"), 16)
    assert predict(loaded, tokenizer, examples, spec.max_length) == predict(ours, tokenizer, examples, spec.max_length)
    # Not just the argmax: the logits agree.
    batch = collate(tokenizer, examples, "classification", spec.max_length)
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-6)


def test_adapter_config_names_the_base_model(first: Run, tmp_path: Path) -> None:
    """adapter_config.json carries the registry's hub id, so users know which base to load.

    Fails until shared/models.py stops peft from overwriting base_model_name_or_path with None.
    """
    folder = extract_archive(first.archive, tmp_path / "global")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "pwff/tiny-bert"


@pytest.mark.parametrize(("num_clients", "per_round"), [(4, 3), (10, 1), (10, 10), (1000, 17)])
def test_sample_clients_is_deterministic_and_within_range(num_clients: int, per_round: int) -> None:
    spec = JobSpec(num_clients=num_clients, clients_per_round=per_round, seed=3)
    draws = [sample_clients(spec, round_) for round_ in range(1, 21)]
    for round_, chosen in enumerate(draws, start=1):
        assert chosen == sample_clients(spec, round_)
        assert chosen == sorted(set(chosen)) and len(chosen) == per_round
        assert all(isinstance(c, int) and 0 <= c < num_clients for c in chosen)
    if per_round < num_clients:
        assert len({tuple(chosen) for chosen in draws}) > 1  # rounds differ
        other_seed = JobSpec(num_clients=num_clients, clients_per_round=per_round, seed=4)
        assert [sample_clients(other_seed, r) for r in range(1, 21)] != draws
    else:
        assert all(chosen == list(range(num_clients)) for chosen in draws)


def test_sample_clients_depends_only_on_sampling_fields() -> None:
    spec = JobSpec(num_clients=8, clients_per_round=3, seed=5)
    renamed = JobSpec(num_clients=8, clients_per_round=3, seed=5, name="other", rounds=9, local_steps=1)
    assert [sample_clients(spec, r) for r in range(1, 10)] == [sample_clients(renamed, r) for r in range(1, 10)]


def test_same_state_publishes_byte_identical_archives(spec: JobSpec, cache_dir: Path) -> None:
    """The gzip header carries a timestamp unless told otherwise: archives of one state must not differ."""
    model = build_peft_model(spec, cache_dir)
    first = peft_folder_archive(model)
    time.sleep(1.1)  # gzip stamps whole seconds
    assert peft_folder_archive(model) == first
