"""The scheduler's round loop, driven through its public API with a fake clock.

Most tests play the aggregator's part by hand: they encode its events and hand them to
`Scheduler.handle_event`, and read what the scheduler asks of the aggregator and the
workers off the in-process bus. The deadline tests that depend on how many updates were
merged use the real aggregator (tiny-bert) for the merging, because the aggregator is the
one that records which updates it merged.

Late updates (dropped and counted as `pwff_updates_received_total{outcome="late"}`) are
the aggregator's concern and are covered in tests/test_aggregator.py
(`test_late_update_after_commit_is_dropped`, `test_update_for_a_cancelled_job_is_late`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import BaseModel

from services.aggregator.aggregator import Aggregator
from services.scheduler.core import RESEND_AFTER_S, STATE_LOST_ERROR, JobConflict, Scheduler, pack_tasks
from shared.bus import Queues
from shared.bus.memory import MemoryBus
from shared.messages import (
    AggregatorCommand,
    ClientEvaluated,
    CloseRound,
    DropJob,
    EvaluateTask,
    InitJob,
    JobInitialized,
    MoreWork,
    RoundCommitted,
    TrainTask,
    UpdateMerged,
    WorkerTask,
    decode_aggregator,
    decode_task,
    encode,
)
from shared.spec import JobSpec
from shared.state import JobNotFound, JobState, RoundStatus
from shared.store.memory import MemoryStore
from tests.test_aggregator import World

T0 = 1_000_000.0
DEADLINE_S = 100.0
SMALL: dict[str, Any] = {
    "model": "tiny-bert",
    "dataset": "bbc-news",
    "num_clients": 4,
    "clients_per_round": 4,
    "rounds": 2,
    "local_steps": 3,
    "round_deadline_s": DEADLINE_S,
    "quorum": 0.5,
}
ALL_CLIENTS = [0, 1, 2, 3]


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def drain(bus: MemoryBus, queue: str) -> list[bytes]:
    """Every message ready on `queue`, taken off through the public consume API (never blocks)."""
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
class Harness:
    """A scheduler on a MemoryBus and MemoryStore; the test plays the aggregator and the workers."""

    spec: JobSpec
    clock: FakeClock = field(default_factory=FakeClock)
    bus: MemoryBus = field(default_factory=MemoryBus)
    store: MemoryStore = field(default_factory=MemoryStore)
    namespace: str = "sched-test"

    def __post_init__(self) -> None:
        self.queues = Queues(self.namespace)
        self.scheduler = Scheduler(self.bus, self.store, namespace=self.namespace, clock=self.clock)

    def send(self, event: BaseModel) -> None:
        self.scheduler.handle_event(encode(event))

    def commands(self) -> list[AggregatorCommand]:
        return [decode_aggregator(body) for body in drain(self.bus, self.queues.aggregate)]

    def tasks(self) -> list[WorkerTask]:
        return [decode_task(body) for body in drain(self.bus, self.queues.tasks)]

    def quiet(self) -> bool:
        """Nothing was sent to the aggregator or the workers."""
        return self.commands() == [] and self.tasks() == []

    def state(self, job_id: str) -> str:
        return str(self.scheduler.get_job(job_id)["state"])

    def start(self) -> tuple[str, list[TrainTask]]:
        """Submit the job, answer its InitJob; returns the job id and round 1's tasks."""
        job_id = self.scheduler.submit(self.spec)
        assert self.commands() == [InitJob(job_id=job_id)]
        self.send(JobInitialized(job_id=job_id, metrics={"accuracy": 0.25}))
        tasks = self.tasks()
        assert all(isinstance(task, TrainTask) for task in tasks)
        return job_id, [task for task in tasks if isinstance(task, TrainTask)]

    def merge_all(self, job_id: str, round_: int, clients: list[int] = ALL_CLIENTS, first: int = 1) -> None:
        for count, client in enumerate(clients, start=first):
            self.send(UpdateMerged(job_id=job_id, round=round_, client=client, merged_count=count))

    def commit(self, job_id: str, round_: int) -> None:
        self.send(RoundCommitted(job_id=job_id, round=round_, clients=ALL_CLIENTS, metrics={"accuracy": 0.5}))

    def run_round(self, job_id: str, round_: int) -> None:
        """Every update merged, the close request answered with a commit."""
        self.merge_all(job_id, round_)
        assert self.commands() == [CloseRound(job_id=job_id, round=round_, force=False)]
        self.commit(job_id, round_)

    def finish(self) -> str:
        """A job that ran both rounds and got every client evaluation: succeeded."""
        job_id, _ = self.start()
        self.run_round(job_id, 1)
        self.tasks()
        self.run_round(job_id, 2)
        for task in self.tasks():
            self.send(ClientEvaluated(job_id=job_id, round=2, client=task.client, metrics={"global_accuracy": 0.5}))
        assert self.state(job_id) == "succeeded"
        return job_id


@pytest.fixture
def harness(tiny_spec: Callable[..., JobSpec]) -> Harness:
    return Harness(tiny_spec(**SMALL))


@pytest.fixture
def fwd_harness(tiny_spec: Callable[..., JobSpec]) -> Harness:
    return Harness(
        tiny_spec(**SMALL, mode="fwd", fwd={"perturbations_per_task": 16, "max_perturbations_per_step": 256})
    )


# --- with the real aggregator doing the merging ---------------------------------------------


@dataclass
class Merging:
    world: World
    clock: FakeClock

    @property
    def job_id(self) -> str:
        return self.world.job_id

    def merge(self, clients: list[int]) -> None:
        """Workers announce an update for each client; the aggregator merges; the scheduler hears of it."""
        for client in clients:
            self.world.aggregator.handle(self.world.announce(client))
        for body in drain(self.world.bus, self.world.queues.events):
            self.world.scheduler.handle_event(body)

    def commands(self) -> list[AggregatorCommand]:
        return [decode_aggregator(body) for body in drain(self.world.bus, self.world.queues.aggregate)]


@pytest.fixture
def merging(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> Merging:
    clock = FakeClock()
    bus, store = MemoryBus(), MemoryStore()
    spec = tiny_spec(**SMALL, eval_max_examples=8)
    scheduler = Scheduler(bus, store, clock=clock)
    aggregator = Aggregator(bus, store, cache_dir=cache_dir)
    queues = Queues()
    job_id = scheduler.submit(spec)
    [init] = drain(bus, queues.aggregate)
    aggregator.handle(init)
    for body in drain(bus, queues.events):
        scheduler.handle_event(body)
    tasks = [decode_task(body) for body in drain(bus, queues.tasks)]
    clients = sorted(task.client for task in tasks)
    assert clients == ALL_CLIENTS
    assert scheduler.get_job(job_id)["state"] == "running"
    return Merging(World(bus, store, scheduler, aggregator, spec, job_id, clients, cache_dir), clock)


def test_round_closes_at_its_deadline_when_the_quorum_is_in(merging: Merging) -> None:
    merging.merge([0, 1])  # 2 of 4: the quorum (0.5)
    assert merging.commands() == []

    merging.clock.now = T0 + DEADLINE_S - 0.5
    merging.world.scheduler.tick()
    assert merging.commands() == []

    merging.clock.now = T0 + DEADLINE_S
    merging.world.scheduler.tick()
    assert merging.commands() == [CloseRound(job_id=merging.job_id, round=1, force=True)]
    merging.world.scheduler.tick()
    assert merging.commands() == []  # asked once, not on every tick
    assert merging.world.scheduler.get_job(merging.job_id)["state"] == "running"

    # No commit: the forced close is asked for again, still forced.
    merging.clock.now = T0 + DEADLINE_S + RESEND_AFTER_S + 1
    merging.world.scheduler.tick()
    assert merging.commands() == [CloseRound(job_id=merging.job_id, round=1, force=True)]


def test_job_fails_when_the_quorum_is_missing_at_the_deadline(merging: Merging) -> None:
    merging.merge([2])  # 1 of 4; the quorum is 2
    merging.clock.now = T0 + DEADLINE_S - 0.5
    merging.world.scheduler.tick()
    assert merging.commands() == []
    assert merging.world.scheduler.get_job(merging.job_id)["state"] == "running"

    merging.clock.now = T0 + DEADLINE_S
    merging.world.scheduler.tick()
    job = merging.world.scheduler.get_job(merging.job_id)
    assert job["state"] == "failed"
    error = job["error"]
    assert "round 1" in error and "1 of 4" in error and "quorum is 2" in error, error
    assert merging.commands() == [DropJob(job_id=merging.job_id)]

    merging.clock.now += 10 * RESEND_AFTER_S
    merging.world.scheduler.tick()
    assert merging.commands() == []
    assert merging.world.scheduler.get_job(merging.job_id)["state"] == "failed"


# --- the aggregator played by the test ------------------------------------------------------


def test_round_one_opens_with_one_task_per_client_and_full_budgets(harness: Harness) -> None:
    job_id, tasks = harness.start()
    assert sorted(task.client for task in tasks) == ALL_CLIENTS
    for task in tasks:
        assert (task.job_id, task.round, task.wave, task.attempt) == (job_id, 1, 0, 0)
        assert task.local_steps == harness.spec.local_steps and task.perturbations == 0
    job = harness.scheduler.get_job(job_id)
    assert (job["state"], job["round"], job["rounds"], job["error"]) == ("running", 1, 2, None)


def test_pack_tasks_fills_batches_of_clients_that_share_a_budget() -> None:
    same = {"local_steps": 1, "perturbations": 4}
    assert pack_tasks([(client, same) for client in range(7)], 3) == [
        ([0, 1, 2], same),
        ([3, 4, 5], same),
        ([6], same),
    ]
    assert pack_tasks([(client, same) for client in range(3)], 1) == [([0], same), ([1], same), ([2], same)]
    # Deadline budgets differ by device: a batch carries one budget, so a different one starts a new batch.
    less = {"local_steps": 1, "perturbations": 2}
    budgets = [(0, same), (1, less), (2, less), (3, same), (4, same)]
    assert pack_tasks(budgets, 4) == [([0], same), ([1, 2], less), ([3, 4], same)]
    assert pack_tasks([], 4) == []


def test_clients_per_task_packs_a_round_and_a_wave_into_batches(tiny_spec: Callable[..., JobSpec]) -> None:
    h = Harness(
        tiny_spec(
            **{**SMALL, "num_clients": 7, "clients_per_round": 7},
            mode="fwd",
            fwd={"perturbations_per_task": 16, "max_perturbations_per_step": 256},
            clients_per_task=3,
        )
    )
    job_id, tasks = h.start()
    assert [task.batch for task in tasks] == [[0, 1, 2], [3, 4, 5], [6]]
    assert tasks[-1].clients == []  # a batch of one is a plain task
    assert all(task.perturbations == 16 and task.wave == 0 for task in tasks)
    assert REGISTRY.get_sample_value("pwff_tasks_dispatched_total") is not None

    # Every client's update counts on its own: the round closes once all seven are merged, not three.
    h.merge_all(job_id, 1, clients=[0, 1, 2, 3, 4, 5])
    assert h.commands() == []
    h.merge_all(job_id, 1, clients=[6], first=7)
    assert h.commands() == [CloseRound(job_id=job_id, round=1, force=False)]

    # A wave of four perturbation tasks (64 more perturbations) goes out in batches too.
    h.send(MoreWork(job_id=job_id, round=1, wave=1, variance=0.9, perturbations=7 * 16 + 48))
    wave = [task for task in h.tasks() if isinstance(task, TrainTask)]
    assert all(task.wave == 1 for task in wave)
    batches = [task.batch for task in wave]
    assert all(len(batch) <= 3 for batch in batches) and sum(len(batch) for batch in batches) >= 1
    assert len({client for batch in batches for client in batch}) == sum(len(batch) for batch in batches)


def test_round_closes_as_soon_as_every_update_is_in(harness: Harness) -> None:
    job_id, _ = harness.start()
    harness.merge_all(job_id, 1, clients=[3, 0, 2])
    assert harness.quiet()
    harness.clock.now = T0 + DEADLINE_S - 1  # before the deadline
    harness.merge_all(job_id, 1, clients=[1], first=4)
    assert harness.commands() == [CloseRound(job_id=job_id, round=1, force=False)]
    assert harness.tasks() == []

    harness.scheduler.tick()
    assert harness.quiet()
    # Past the deadline (but not the resend time) the round is closing: it neither fails nor is forced.
    harness.clock.now = T0 + DEADLINE_S + 1
    harness.scheduler.tick()
    assert harness.quiet()
    assert harness.state(job_id) == "running"


def test_init_job_is_resent_while_the_job_is_queued(harness: Harness) -> None:
    job_id = harness.scheduler.submit(harness.spec)
    assert harness.commands() == [InitJob(job_id=job_id)]
    assert harness.state(job_id) == "queued"

    harness.clock.now = T0 + RESEND_AFTER_S - 1
    harness.scheduler.tick()
    assert harness.commands() == []

    harness.clock.now = T0 + RESEND_AFTER_S + 1
    harness.scheduler.tick()
    assert harness.commands() == [InitJob(job_id=job_id)]
    harness.scheduler.tick()
    assert harness.commands() == []  # the resend restarts the wait

    harness.clock.now = T0 + 2 * RESEND_AFTER_S + 2
    harness.scheduler.tick()
    assert harness.commands() == [InitJob(job_id=job_id)]

    # Once initialized, the job is running and InitJob is never sent again.
    harness.send(JobInitialized(job_id=job_id, metrics={}))
    assert len(harness.tasks()) == 4
    harness.clock.now += RESEND_AFTER_S + 1
    harness.scheduler.tick()
    assert harness.commands() == []
    assert harness.state(job_id) == "running"


def test_close_round_is_resent_until_the_round_commits(harness: Harness) -> None:
    job_id, _ = harness.start()
    harness.clock.now = T0 + 5
    harness.merge_all(job_id, 1)
    close = CloseRound(job_id=job_id, round=1, force=False)
    assert harness.commands() == [close]

    harness.clock.now = T0 + 5 + RESEND_AFTER_S - 1
    harness.scheduler.tick()
    assert harness.commands() == []

    harness.clock.now = T0 + 5 + RESEND_AFTER_S + 1
    harness.scheduler.tick()
    assert harness.commands() == [close]
    harness.scheduler.tick()
    assert harness.commands() == []

    harness.commit(job_id, 1)
    assert {task.round for task in harness.tasks()} == {2}
    harness.clock.now += RESEND_AFTER_S + 1
    harness.scheduler.tick()
    assert harness.commands() == []


def test_commit_opens_the_next_round_with_its_budgets(harness: Harness) -> None:
    job_id, _ = harness.start()
    harness.clock.now = T0 + 30
    harness.run_round(job_id, 1)
    tasks = harness.tasks()
    assert len(tasks) == 4
    assert all(isinstance(task, TrainTask) for task in tasks)
    train = [task for task in tasks if isinstance(task, TrainTask)]
    assert sorted(task.client for task in train) == ALL_CLIENTS
    for task in train:
        assert (task.job_id, task.round, task.wave, task.attempt) == (job_id, 2, 0, 0)
        assert task.local_steps == harness.spec.local_steps and task.perturbations == 0
    job = harness.scheduler.get_job(job_id)
    assert (job["state"], job["round"]) == ("running", 2)
    assert harness.commands() == []

    # Round 2's deadline runs from its opening, not from the job's start.
    harness.clock.now = T0 + 30 + DEADLINE_S - 1
    harness.scheduler.tick()
    assert harness.quiet() and harness.state(job_id) == "running"


def test_last_round_waits_for_every_client_evaluation(harness: Harness) -> None:
    job_id, _ = harness.start()
    harness.run_round(job_id, 1)
    harness.tasks()
    harness.run_round(job_id, 2)

    tasks = harness.tasks()
    assert sorted(task.client for task in tasks) == ALL_CLIENTS
    for task in tasks:
        assert isinstance(task, EvaluateTask)
        assert (task.job_id, task.round, task.publish) == (job_id, 2, True)
    assert harness.commands() == []
    assert harness.state(job_id) == "running"

    for client in [2, 0, 3]:
        harness.send(ClientEvaluated(job_id=job_id, round=2, client=client, metrics={"global_accuracy": 0.5}))
        assert harness.state(job_id) == "running"
    harness.send(ClientEvaluated(job_id=job_id, round=2, client=1, metrics={"global_accuracy": 0.5}))
    job = harness.scheduler.get_job(job_id)
    assert (job["state"], job["error"]) == ("succeeded", None)
    assert harness.quiet()  # no round 3, no DropJob


def test_missing_evaluations_end_the_job_at_the_deadline(harness: Harness) -> None:
    job_id, _ = harness.start()
    harness.run_round(job_id, 1)
    harness.tasks()
    harness.clock.now = T0 + 50
    harness.run_round(job_id, 2)
    assert len(harness.tasks()) == 4
    for client in [1, 3]:
        harness.send(ClientEvaluated(job_id=job_id, round=2, client=client, metrics={"global_accuracy": 0.5}))

    harness.clock.now = T0 + 50 + DEADLINE_S - 1
    harness.scheduler.tick()
    assert harness.state(job_id) == "running"

    harness.clock.now = T0 + 50 + DEADLINE_S
    harness.scheduler.tick()
    job = harness.scheduler.get_job(job_id)
    assert job["state"] == "succeeded"
    assert job["error"] and "2 client evaluations arrived" in job["error"], job["error"]
    assert harness.tasks() == []

    # A straggler evaluation after the end changes nothing.
    harness.send(ClientEvaluated(job_id=job_id, round=2, client=0, metrics={"global_accuracy": 0.5}))
    assert harness.scheduler.get_job(job_id)["state"] == "succeeded"


def test_repeated_events_are_harmless(harness: Harness) -> None:
    job_id, _ = harness.start()
    harness.send(JobInitialized(job_id=job_id, metrics={}))  # again: round 1 is not opened twice
    assert harness.quiet()

    harness.merge_all(job_id, 1)
    assert harness.commands() == [CloseRound(job_id=job_id, round=1, force=False)]
    harness.merge_all(job_id, 1)  # a redelivered "merged" does not close twice
    assert harness.quiet()

    harness.commit(job_id, 1)
    assert len(harness.tasks()) == 4
    harness.commit(job_id, 1)  # a second commit of round 1 opens nothing new
    harness.merge_all(job_id, 1)  # and a merge for the committed round closes nothing
    assert harness.quiet()
    assert harness.scheduler.get_job(job_id)["round"] == 2

    harness.run_round(job_id, 2)
    assert len(harness.tasks()) == 4
    harness.commit(job_id, 2)  # the last round's commit repeated: no second set of evaluations
    harness.commit(job_id, 1)  # an old one arriving very late
    assert harness.quiet()
    assert harness.state(job_id) == "running"


def test_events_for_an_unknown_job_are_ignored(harness: Harness) -> None:
    job_id, _ = harness.start()
    before = harness.scheduler.get_job(job_id)
    ghost = "no-such-job"
    for event in [
        JobInitialized(job_id=ghost, metrics={}),
        UpdateMerged(job_id=ghost, round=1, client=0, merged_count=4),
        MoreWork(job_id=ghost, round=1, wave=1, variance=1.0, perturbations=16),
        RoundCommitted(job_id=ghost, round=1, clients=[0], metrics={}),
        ClientEvaluated(job_id=ghost, round=1, client=0, metrics={}),
    ]:
        harness.send(event)
    assert harness.quiet()
    assert harness.scheduler.get_job(job_id) == before
    with pytest.raises(JobNotFound):
        harness.scheduler.get_job(ghost)


def test_fwd_more_work_dispatches_one_wave(fwd_harness: Harness) -> None:
    h = fwd_harness
    job_id, tasks = h.start()
    per_task = h.spec.fwd.perturbations_per_task
    assert sorted(task.client for task in tasks) == ALL_CLIENTS
    assert all(task.wave == 0 and task.perturbations == per_task for task in tasks)

    h.merge_all(job_id, 1)
    assert h.commands() == [CloseRound(job_id=job_id, round=1, force=False)]

    h.clock.now = T0 + 40
    more = MoreWork(job_id=job_id, round=1, wave=1, variance=0.9, perturbations=4 * per_task)
    h.send(more)
    wave = h.tasks()
    assert sorted(task.client for task in wave) == ALL_CLIENTS
    for task in wave:
        assert isinstance(task, TrainTask)
        assert (task.job_id, task.round, task.wave, task.perturbations) == (job_id, 1, 1, per_task)
    assert h.commands() == []

    h.send(more)  # repeated: no second wave
    assert h.quiet()

    # The wave's updates: 8 of 8 merged closes the round again.
    h.merge_all(job_id, 1, first=5)
    assert h.commands() == [CloseRound(job_id=job_id, round=1, force=False)]
    h.send(more)  # a stale MoreWork for a wave already sent
    assert h.quiet()


def test_fwd_wave_restarts_the_round_deadline(fwd_harness: Harness) -> None:
    h = fwd_harness
    job_id, _ = h.start()
    h.merge_all(job_id, 1)
    h.commands()
    h.clock.now = T0 + 90
    h.send(MoreWork(job_id=job_id, round=1, wave=1, variance=0.9, perturbations=64))
    assert len(h.tasks()) == 4
    h.clock.now = T0 + DEADLINE_S + 1  # round 1's first deadline, but the wave has its own
    h.scheduler.tick()
    assert h.quiet() and h.state(job_id) == "running"


def test_fwd_more_work_past_the_perturbation_cap_forces_the_close(fwd_harness: Harness) -> None:
    h = fwd_harness
    job_id, _ = h.start()
    h.merge_all(job_id, 1)
    assert h.commands() == [CloseRound(job_id=job_id, round=1, force=False)]
    cap, per_task = h.spec.fwd.max_perturbations_per_step, h.spec.fwd.perturbations_per_task
    # Room for two more tasks under the cap: a partial wave of two.
    h.send(MoreWork(job_id=job_id, round=1, wave=1, variance=0.9, perturbations=cap - 2 * per_task))
    partial = h.tasks()
    assert len(partial) == 2 and len({task.client for task in partial}) == 2
    assert all(isinstance(task, TrainTask) and task.wave == 1 for task in partial)
    h.merge_all(job_id, 1, clients=[task.client for task in partial], first=5)
    assert h.commands() == [CloseRound(job_id=job_id, round=1, force=False)]
    # At the cap: no wave, the round is committed as it is.
    h.send(MoreWork(job_id=job_id, round=1, wave=2, variance=0.9, perturbations=cap))
    assert h.tasks() == []
    assert h.commands() == [CloseRound(job_id=job_id, round=1, force=True)]


def test_cancel_a_running_job(harness: Harness) -> None:
    job_id, _ = harness.start()
    harness.merge_all(job_id, 1, clients=[0])
    harness.scheduler.cancel(job_id)
    assert harness.state(job_id) == "cancelled"
    assert harness.commands() == [DropJob(job_id=job_id)]

    # Nothing more happens for it: no deadline, no round opened by a late commit.
    harness.clock.now = T0 + 10 * DEADLINE_S
    harness.scheduler.tick()
    harness.merge_all(job_id, 1, clients=[1, 2, 3], first=2)
    harness.commit(job_id, 1)
    assert harness.quiet()
    assert harness.state(job_id) == "cancelled"

    with pytest.raises(JobConflict):
        harness.scheduler.cancel(job_id)
    with pytest.raises(JobNotFound):
        harness.scheduler.cancel("no-such-job")


def test_cancelling_a_finished_job_is_a_conflict(harness: Harness) -> None:
    job_id = harness.finish()
    with pytest.raises(JobConflict):
        harness.scheduler.cancel(job_id)
    assert harness.state(job_id) == "succeeded"
    assert harness.quiet()


def test_cancel_a_queued_job(harness: Harness) -> None:
    job_id = harness.scheduler.submit(harness.spec)
    harness.commands()
    harness.scheduler.cancel(job_id)
    assert harness.state(job_id) == "cancelled"
    assert harness.commands() == [DropJob(job_id=job_id)]
    # The aggregator's belated answer does not start it, and InitJob is not resent.
    harness.send(JobInitialized(job_id=job_id, metrics={}))
    harness.clock.now = T0 + 10 * RESEND_AFTER_S
    harness.scheduler.tick()
    assert harness.quiet()
    assert harness.state(job_id) == "cancelled"


# --- a scheduler killed between two writes, a store that loses its state ----------------------


def test_a_running_job_with_no_round_open_gets_round_one(harness: Harness) -> None:
    """Killed after marking the job running, before opening round 1: JobInitialized is not resent for a
    running job, so the tick must open the round, or the job would stay running forever."""
    job_id = harness.scheduler.submit(harness.spec)
    harness.commands()
    harness.scheduler.jobs.update(job_id, state=JobState.RUNNING)  # what the killed scheduler left
    harness.scheduler.tick()
    assert sorted(task.client for task in harness.tasks()) == ALL_CLIENTS
    assert harness.scheduler.get_job(job_id)["round"] == 1


def test_a_committed_round_whose_successor_never_opened_is_followed(harness: Harness) -> None:
    """Killed after marking round 1 committed, before opening round 2: the redelivered RoundCommitted finds
    the round done, so the tick must open the next one."""
    job_id, _ = harness.start()
    harness.merge_all(job_id, 1)
    harness.commands()
    harness.scheduler.jobs.update_plan(job_id, 1, status=RoundStatus.COMMITTED)  # what the killed scheduler left
    harness.commit(job_id, 1)  # the aggregator's event, redelivered
    assert harness.tasks() == []
    harness.scheduler.tick()
    assert sorted(task.client for task in harness.tasks()) == ALL_CLIENTS
    assert harness.scheduler.get_job(job_id)["round"] == 2


def test_a_store_that_loses_its_state_fails_every_unfinished_job(harness: Harness) -> None:
    done = harness.finish()
    running, _ = harness.start()
    harness.merge_all(running, 1, [0, 1])
    queued = harness.scheduler.submit(harness.spec)
    assert harness.commands() == [InitJob(job_id=queued)]
    harness.scheduler.tick()
    assert harness.scheduler.store_state_known
    lost_before = REGISTRY.get_sample_value("pwff_store_state_lost_total") or 0.0

    harness.store.delete_prefix("")  # Redis restarted without persistence: everything is gone
    with pytest.raises(JobNotFound):
        harness.scheduler.get_job(running)
    harness.clock.now = T0 + 5
    harness.scheduler.tick()

    assert harness.scheduler.store_state_known  # a new marker: the lost jobs are recorded
    assert REGISTRY.get_sample_value("pwff_store_state_lost_total") == lost_before + 1
    for job_id, state in ((running, "running"), (queued, "queued")):
        job = harness.scheduler.get_job(job_id)
        assert job["state"] == "failed", job
        assert job["error"] == STATE_LOST_ERROR.format(state=state, round=1 if job_id == running else 0)
        assert job["updated_at"] == T0 + 5
    assert {job["id"] for job in harness.scheduler.list_jobs()} == {running, queued}  # the ended one is gone
    with pytest.raises(JobNotFound):
        harness.scheduler.get_job(done)
    # The aggregator is told to drop them; nothing is started again, from scratch or otherwise.
    assert sorted(c.job_id for c in harness.commands() if isinstance(c, DropJob)) == sorted([running, queued])
    harness.send(UpdateMerged(job_id=running, round=1, client=2, merged_count=3))
    harness.send(JobInitialized(job_id=queued, metrics={}))
    harness.clock.now = T0 + 10 * RESEND_AFTER_S
    harness.scheduler.tick()
    assert harness.quiet()
    assert REGISTRY.get_sample_value("pwff_store_state_lost_total") == lost_before + 1


def test_a_second_scheduler_does_not_record_a_lost_job_twice(harness: Harness) -> None:
    job_id, _ = harness.start()
    other = Scheduler(harness.bus, harness.store, namespace=harness.namespace, clock=harness.clock)
    harness.scheduler.tick()
    other.tick()
    harness.store.delete_prefix("")
    harness.scheduler.tick()
    first = harness.scheduler.get_job(job_id)
    harness.clock.now = T0 + 1
    other.tick()  # finds the first one's new marker: it lost its state too, but the job is recorded
    assert other.get_job(job_id) == first and first["state"] == "failed"
    assert other.store_state_known and harness.scheduler.store_state_known
    harness.scheduler.tick()  # and the first one does not take the second's check for a new loss
    assert harness.scheduler.get_job(job_id) == first


def test_a_dispatch_cut_short_is_done_again_by_the_tick(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker goes away while round 2's tasks are published (past the bus's retries): the event handler
    fails after two of four, and its redelivery finds the round already open. The tick publishes them again."""
    job_id, _ = harness.start()
    harness.merge_all(job_id, 1)
    harness.commands()
    publish = harness.bus.publish
    sent: list[str] = []

    def failing(queue: str, body: bytes) -> None:
        if queue == harness.queues.tasks and len(sent) == 2:
            raise ConnectionError("broker gone")
        sent.append(queue)
        publish(queue, body)

    monkeypatch.setattr(harness.bus, "publish", failing)
    with pytest.raises(ConnectionError):
        harness.commit(job_id, 1)
    monkeypatch.setattr(harness.bus, "publish", publish)
    assert len(harness.tasks()) == 2
    harness.commit(job_id, 1)  # the redelivered event: the round is open, nothing to do
    assert harness.tasks() == []

    harness.scheduler.tick()
    tasks = harness.tasks()
    assert sorted(task.client for task in tasks) == ALL_CLIENTS and {task.round for task in tasks} == {2}
    harness.scheduler.tick()
    assert harness.quiet()
