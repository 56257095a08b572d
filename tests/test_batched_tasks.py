"""Batched tasks (`clients_per_task`): a worker trains a batch's clients one after another, and the job's
result is the one it would have been with one task per client.

The worker tests drive a Scheduler, an Aggregator and a Worker by hand on the in-process bus and store (a
tiny-bert fwd job), so each step of a batch can be looked at: one UpdateReady per client, a failing client
reported alone, a batch cut short and redelivered merged exactly once. The embedded runs compare whole jobs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY

from services.aggregator.aggregator import Aggregator
from services.embedded import EmbeddedCluster
from services.scheduler.core import Scheduler
from services.worker.worker import Worker
from shared.bus import Queues
from shared.bus.memory import MemoryBus
from shared.codec import decode_tensors
from shared.messages import (
    ClientFailed,
    InvalidMessage,
    TrainTask,
    UpdateMerged,
    UpdateReady,
    decode_aggregator,
    decode_scheduler,
    decode_task,
    encode,
)
from shared.modes.base import TaskFailed
from shared.spec import JobSpec
from shared.store import Keys
from shared.store.memory import MemoryStore

FWD: dict[str, Any] = {
    "mode": "fwd",
    "rounds": 2,
    "batch_size": 4,
    "fwd": {
        "regime": "fedsgd",
        "perturb": "head",
        "perturbations_per_task": 1,
        "candidates": 2,
        "variance_control": "fixed",
        "max_perturbations_per_step": 64,
        "lr": 0.5,
    },
}


def drain(bus: MemoryBus, queue: str) -> list[bytes]:
    """Every message ready on `queue` (never blocks)."""
    out: list[bytes] = []
    if bus.depth(queue) == 0:
        return out
    stop = threading.Event()

    def take(body: bytes) -> None:
        out.append(body)
        if bus.depth(queue) == 0:
            stop.set()

    bus.consume(queue, take, stop)
    return out


@dataclass
class Services:
    bus: MemoryBus
    scheduler: Scheduler
    aggregator: Aggregator
    worker: Worker
    queues: Queues
    job_id: str
    tasks: list[bytes]

    def updates(self) -> list[UpdateReady]:
        commands = [decode_aggregator(body) for body in drain(self.bus, self.queues.aggregate)]
        return [command for command in commands if isinstance(command, UpdateReady)]

    def merge(self, updates: list[UpdateReady]) -> list[UpdateMerged]:
        """The aggregator takes each announcement; what it told the scheduler that it merged."""
        for update in updates:
            self.aggregator.handle(encode(update))
        events = [decode_scheduler(body) for body in drain(self.bus, self.queues.events)]
        return [event for event in events if isinstance(event, UpdateMerged)]


@pytest.fixture
def services(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> Services:
    """A running job of four clients in one batch, round 1's batch waiting on the task queue."""
    bus, store, queues = MemoryBus(), MemoryStore(), Queues()
    scheduler = Scheduler(bus, store)
    aggregator = Aggregator(bus, store, cache_dir=cache_dir)
    worker = Worker(bus, store, cache_dir=cache_dir)
    job_id = scheduler.submit(tiny_spec(**FWD, num_clients=4, clients_per_round=4, clients_per_task=4))
    [init] = drain(bus, queues.aggregate)
    aggregator.handle(init)
    for body in drain(bus, queues.events):
        scheduler.handle_event(body)
    tasks = drain(bus, queues.tasks)
    return Services(bus, scheduler, aggregator, worker, queues, job_id, tasks)


def test_a_batch_trains_each_client_and_announces_one_update_each(services: Services) -> None:
    [body] = services.tasks
    batch = decode_task(body)
    assert isinstance(batch, TrainTask) and batch.batch == [0, 1, 2, 3]
    services.worker.handle(body)
    updates = services.updates()
    assert [update.client for update in updates] == [0, 1, 2, 3]
    assert len({update.key for update in updates}) == 4
    assert all(update.perturbations == 1 and update.round == 1 and update.wave == 0 for update in updates)
    merged = services.merge(updates)
    assert sorted(event.client for event in merged) == [0, 1, 2, 3]
    assert max(event.merged_count for event in merged) == 4


def test_a_failing_client_is_reported_alone_and_the_batch_goes_on(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = services.worker
    train = worker._train

    def failing_client_2(task: TrainTask, spec: JobSpec) -> str:
        if task.client == 2:
            raise TaskFailed("client 2: its shard is empty")
        return train(task, spec)

    monkeypatch.setattr(worker, "_train", failing_client_2)
    [body] = services.tasks
    worker.handle(body)  # returns: the batch is acked, not dead-lettered
    assert [update.client for update in services.updates()] == [0, 1, 3]
    events = [decode_scheduler(body) for body in drain(services.bus, services.queues.events)]
    assert events == [
        ClientFailed(job_id=services.job_id, round=1, client=2, reason="client 2: its shard is empty"),
    ]


def test_a_batch_cut_short_and_redelivered_merges_each_client_once(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = services.worker
    train = worker._train

    def dies_at_client_2(task: TrainTask, spec: JobSpec) -> str:
        if task.client == 2:
            raise ConnectionError("the worker's connection dropped")  # transient: the bus redelivers
        return train(task, spec)

    [body] = services.tasks
    monkeypatch.setattr(worker, "_train", dies_at_client_2)
    with pytest.raises(ConnectionError):
        worker.handle(body)
    first = services.updates()
    assert [update.client for update in first] == [0, 1]
    merged = services.merge(first)

    monkeypatch.setattr(worker, "_train", train)
    worker.handle(body)  # the redelivery: clients 0 and 1 are announced again from the store, not retrained
    again = services.updates()
    assert [update.client for update in again] == [0, 1, 2, 3]
    assert [update.key for update in again[:2]] == [update.key for update in first]
    duplicates = REGISTRY.get_sample_value("pwff_updates_received_total", {"outcome": "duplicate"}) or 0.0
    merged += services.merge(again)
    # Clients 0 and 1 arrive twice: the aggregator counts the second as a duplicate and merges it no more.
    assert REGISTRY.get_sample_value("pwff_updates_received_total", {"outcome": "duplicate"}) == duplicates + 2
    assert sorted(services.scheduler.state.rounds.merged(services.job_id, 1)) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert {event.client for event in merged} == {0, 1, 2, 3}
    assert max(event.merged_count for event in merged) == 4


@pytest.mark.parametrize(
    ("fields", "error"),
    [({"client": 2, "clients": [2, 9]}, "out of range"), ({"perturbations": 2}, "perturbations=2")],
)
def test_a_batch_wrong_as_a_whole_trains_nobody(services: Services, fields: dict[str, Any], error: str) -> None:
    [body] = services.tasks
    batch = decode_task(body)
    assert isinstance(batch, TrainTask)
    with pytest.raises(InvalidMessage, match=error):
        services.worker.handle(encode(batch.model_copy(update=fields)))
    assert services.updates() == []


def _final_state(spec: JobSpec, cache_dir: Path, workers: int) -> dict[str, torch.Tensor]:
    with EmbeddedCluster(cache_dir, workers=workers) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, poll_s=0.05)
        assert job["state"] == "succeeded", job
        merged = [round_["updates"] for round_ in job["metrics"][1:]]
        assert merged == [spec.clients_per_round] * spec.rounds
        blob = cluster.store.get(Keys().global_state(job_id, spec.rounds))
    assert blob is not None
    return decode_tensors(blob)


@pytest.mark.parametrize("extra", [FWD, {}], ids=["fwd-fedsgd", "backprop"])
def test_batched_tasks_commit_the_same_state_as_one_task_per_client(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path, extra: dict[str, Any]
) -> None:
    common = {**extra, "num_clients": 12, "clients_per_round": 10, "eval_max_examples": 8}
    single = _final_state(tiny_spec(**common), cache_dir, workers=1)
    batched = _final_state(tiny_spec(**common, clients_per_task=4), cache_dir, workers=2)
    assert single.keys() == batched.keys()
    for name, tensor in single.items():
        assert torch.equal(tensor, batched[name]), name
