"""The aggregator over the in-process bus and store, with a tiny-bert job set up by the real scheduler."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
import torch
from prometheus_client import REGISTRY

from services.aggregator.aggregator import Aggregator
from services.scheduler.core import Scheduler, sample_clients
from shared.bus import Queues
from shared.bus.memory import MemoryBus
from shared.codec import decode_tensors, encode_tensors
from shared.forward_grad import ParamSpace, candidate_seed, direction, encode_seed_scalars
from shared.messages import (
    CloseRound,
    DropJob,
    EvaluateTask,
    InitJob,
    InvalidMessage,
    JobInitialized,
    MoreWork,
    RoundCommitted,
    TrainTask,
    UpdateInvalid,
    UpdateMerged,
    UpdateReady,
    decode_aggregator,
    decode_scheduler,
    decode_task,
    encode,
)
from shared.spec import JobSpec
from shared.state import JobState, RoundStatus
from shared.store import Keys
from shared.store.memory import MemoryStore
from tests.harness import drain

State = dict[str, torch.Tensor]
# Figures that measure wall time, so differ between otherwise identical commits.
TIMINGS = {"aggregate_s", "eval_s"}


def received(outcome: str) -> float:
    return REGISTRY.get_sample_value("pwff_updates_received_total", {"outcome": outcome}) or 0.0


@dataclass
class World:
    bus: MemoryBus
    store: MemoryStore
    scheduler: Scheduler
    aggregator: Aggregator
    spec: JobSpec
    job_id: str
    clients: list[int]
    cache_dir: Path
    keys: Keys = field(default_factory=Keys)
    queues: Queues = field(default_factory=Queues)

    def update_key(self, client: int, round_: int = 1, attempt: int = 0, wave: int = 0) -> str:
        return self.keys.update(self.job_id, round_=round_, client=client, wave=wave, attempt=attempt)

    def meta_key(self, client: int, round_: int = 1, wave: int = 0) -> str:
        return self.keys.update_meta(self.job_id, round_=round_, client=client, wave=wave)

    def merged(self, round_: int = 1) -> set[int]:
        """Clients recorded as merged in the store (members are "client" or "client:wave")."""
        return {int(m.split(":")[0]) for m in self.store.set_members(self.keys.round_merged(self.job_id, round_))}

    def events(self) -> list[object]:
        return [decode_scheduler(body) for body in drain(self.bus, self.queues.events)]

    def global_state(self, round_: int) -> State:
        blob = self.store.get(self.keys.global_state(self.job_id, round_))
        assert blob is not None, f"no global state for round {round_}"
        return decode_tensors(blob)

    def delta(self, client: int, scale: float = 0.01) -> State:
        g = torch.Generator().manual_seed(1000 + client)
        # sorted: decode_tensors' dict order is not stable between calls
        return {name: torch.randn(t.shape, generator=g) * scale for name, t in sorted(self.global_state(0).items())}

    def announce(
        self,
        client: int,
        delta: State | None = None,
        round_: int = 1,
        attempt: int = 0,
        num_samples: int | None = None,
        loss: float | None = None,
        key: str | None = None,
        blob: bytes | None = None,
    ) -> bytes:
        """Store an update and its announcement as a worker would; returns the UpdateReady body.

        `blob`: the stored update as it is (e.g. another codec's), instead of `delta` in float32."""
        if blob is None:
            blob = encode_tensors(self.delta(client) if delta is None else delta, "float32")
        key = key or self.update_key(client, round_, attempt)
        self.store.put(key, blob)
        message = encode(
            UpdateReady(
                job_id=self.job_id,
                round=round_,
                client=client,
                attempt=attempt,
                key=key,
                digest=hashlib.sha256(blob).hexdigest(),
                num_samples=num_samples if num_samples is not None else 10 + 7 * client,
                train_loss=loss if loss is not None else 1.0 + client / 10,
                compute_s=0.1 * (client + 1),
                upload_bytes=len(blob),
            )
        )
        self.store.put(self.meta_key(client, round_), message)
        return message

    def close(self, round_: int = 1, aggregator: Aggregator | None = None) -> RoundCommitted:
        (aggregator or self.aggregator).handle(encode(CloseRound(job_id=self.job_id, round=round_)))
        committed = [e for e in self.events() if isinstance(e, RoundCommitted)]
        assert len(committed) == 1
        return committed[0]


@pytest.fixture
def make_world(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> Callable[..., World]:
    def make(**overrides: object) -> World:
        bus, store = MemoryBus(), MemoryStore()
        spec = tiny_spec(**{"eval_max_examples": 8, **overrides})
        scheduler = Scheduler(bus, store)
        aggregator = Aggregator(bus, store, cache_dir=cache_dir)
        job_id = scheduler.submit(spec)
        [init] = drain(bus, Queues().aggregate)
        assert isinstance(decode_aggregator(init), InitJob)
        aggregator.handle(init)
        [event] = drain(bus, Queues().events)
        assert isinstance(decode_scheduler(event), JobInitialized)
        scheduler.handle_event(event)  # running, round 1 opened
        tasks = [decode_task(body) for body in drain(bus, Queues().tasks)]
        clients = [task.client for task in tasks]
        assert len(clients) == spec.clients_per_round
        return World(bus, store, scheduler, aggregator, spec, job_id, clients, cache_dir)

    return make


def weighted_step(previous: State, deltas: list[State], weights: list[float], server_lr: float = 1.0) -> State:
    """previous + server_lr * weighted mean of deltas, computed directly."""
    total = sum(weights)
    out = {}
    for name, value in previous.items():
        mean = sum(d[name].double() * w for d, w in zip(deltas, weights, strict=True)) / total
        out[name] = (value.double() + server_lr * mean).float()
    return out


def assert_states_close(actual: State, expected: State, atol: float = 1e-7) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


def assert_states_equal(actual: State, expected: State) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


# --- round 0 ----------------------------------------------------------------------------------


def test_init_stores_round_zero_and_is_idempotent(make_world: Callable[..., World]) -> None:
    world = make_world()
    state0 = world.global_state(0)
    assert state0 and all(t.dtype == torch.float32 for t in state0.values())
    assert any("lora_A" in name for name in state0) and any("classifier" in name for name in state0)
    [record] = world.store.list_range(world.keys.metrics(world.job_id))
    first = msgpack.unpackb(record)
    assert first["round"] == 0 and first["clients"] == [] and 0.0 <= first["metrics"]["accuracy"] <= 1.0

    world.aggregator.handle(encode(InitJob(job_id=world.job_id)))
    [again] = world.events()
    assert isinstance(again, JobInitialized) and again.metrics == first["metrics"]
    assert_states_equal(world.global_state(0), state0)
    assert len(world.store.list_range(world.keys.metrics(world.job_id))) == 1


def test_round_zero_depends_only_on_the_spec(make_world: Callable[..., World]) -> None:
    assert_states_equal(make_world().global_state(0), make_world().global_state(0))
    other = make_world(seed=8).global_state(0)
    assert any(not torch.equal(other[n], t) for n, t in make_world().global_state(0).items())


def test_a_job_cancelled_while_queued_is_not_initialized(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> None:
    """Its InitJob still waits in the queue when the job is cancelled: the aggregator must not load the
    model and evaluate it (with one consumer, every other job's updates would wait meanwhile)."""
    bus, store = MemoryBus(), MemoryStore()
    scheduler = Scheduler(bus, store)
    aggregator = Aggregator(bus, store, cache_dir=cache_dir)
    job_id = scheduler.submit(tiny_spec(eval_max_examples=8))
    scheduler.cancel(job_id)
    init, drop = drain(bus, Queues().aggregate)
    assert isinstance(decode_aggregator(init), InitJob) and isinstance(decode_aggregator(drop), DropJob)
    aggregator.handle(init)
    aggregator.handle(drop)
    assert aggregator.models._model is None, "the model was loaded for a cancelled job"
    assert store.get(Keys().global_state(job_id, 0)) is None
    assert drain(bus, Queues().events) == []
    assert scheduler.jobs.state(job_id) == JobState.CANCELLED


def test_messages_for_an_unknown_job_are_invalid(make_world: Callable[..., World]) -> None:
    world = make_world()
    before = received("invalid")
    for message in (InitJob(job_id="nope-000"), CloseRound(job_id="nope-000", round=1)):
        with pytest.raises(InvalidMessage, match="unknown job"):
            world.aggregator.handle(encode(message))
    assert received("invalid") == before
    stray = UpdateReady.model_validate({**msgpack.unpackb(world.announce(world.clients[0])), "job_id": "nope-000"})
    with pytest.raises(InvalidMessage, match="unknown job"):
        world.aggregator.handle(encode(stray))
    assert received("invalid") == before + 1


# --- merging and committing ------------------------------------------------------------------


def test_commit_is_previous_plus_weighted_mean_of_deltas(make_world: Callable[..., World]) -> None:
    world = make_world()
    previous = world.global_state(0)
    deltas, weights, losses, sizes = [], [], [], []
    merged_before = received("merged")
    for i, client in enumerate(world.clients):
        body = world.announce(client)
        announce = decode_aggregator(body)
        assert isinstance(announce, UpdateReady)
        world.aggregator.handle(body)
        [event] = world.events()
        assert isinstance(event, UpdateMerged)
        assert (event.client, event.round, event.merged_count) == (client, 1, i + 1)
        deltas.append(world.delta(client))
        weights.append(float(announce.num_samples))
        losses.append(announce.train_loss)
        sizes.append(announce.upload_bytes)
    assert received("merged") == merged_before + len(world.clients)
    assert world.merged() == set(world.clients)

    committed = world.close()
    assert committed.clients == sorted(world.clients)
    assert_states_close(world.global_state(1), weighted_step(previous, deltas, weights))
    metrics = committed.metrics
    assert metrics["num_clients"] == len(world.clients)
    assert metrics["bytes_up"] == sum(sizes)
    weighted_loss = sum(loss * w for loss, w in zip(losses, weights, strict=True)) / sum(weights)
    assert metrics["train_loss"] == pytest.approx(weighted_loss)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    # The round record and the metrics list agree with the event.
    record = msgpack.unpackb(world.store.get(world.keys.round_committed(world.job_id, 1)))
    assert {k: record[k] for k in ("round", "clients", "metrics")} == {
        "round": 1,
        "clients": committed.clients,
        "metrics": metrics,
    }
    # Each client's simulated wireless cost is kept with the round.
    assert sorted(int(c) for c in record["extra"]["devices"]) == sorted(world.clients)
    assert [msgpack.unpackb(r)["round"] for r in world.store.list_range(world.keys.metrics(world.job_id))] == [0, 1]
    assert world.store.get(world.keys.model_archive(world.job_id, "global"))


def test_server_lr_and_uniform_weighting(make_world: Callable[..., World]) -> None:
    world = make_world(aggregation={"server_lr": 0.5, "weighting": "uniform"})
    previous = world.global_state(0)
    for client in world.clients:
        world.aggregator.handle(world.announce(client, num_samples=1 + client % 3))  # uneven, within each shard
    world.events()
    world.close()
    expected = weighted_step(previous, [world.delta(c) for c in world.clients], [1.0] * len(world.clients), 0.5)
    assert_states_close(world.global_state(1), expected)


def test_commit_cleans_up_updates_and_old_globals(make_world: Callable[..., World]) -> None:
    world = make_world()
    for round_ in (1, 2):
        clients = sample_clients(world.spec, round_)
        for client in clients:
            world.aggregator.handle(world.announce(client, round_=round_))
        world.scheduler.handle_event(encode(world.close(round_)))  # opens the next round
        for client in clients:
            assert not world.store.exists(world.update_key(client, round_))
            assert not world.store.exists(world.meta_key(client, round_))
    assert not world.store.exists(world.keys.global_state(world.job_id, 0))  # round 2 drops round 0
    assert world.store.exists(world.keys.global_state(world.job_id, 1))
    assert world.store.exists(world.keys.global_state(world.job_id, 2))


def test_close_is_idempotent(make_world: Callable[..., World]) -> None:
    world = make_world()
    for client in world.clients:
        world.aggregator.handle(world.announce(client))
    world.events()
    first = world.close()
    state = world.global_state(1)
    second = world.close()
    assert second == first
    assert_states_equal(world.global_state(1), state)
    assert len(world.store.list_range(world.keys.metrics(world.job_id))) == 2


def test_close_with_no_updates_carries_the_global_over(make_world: Callable[..., World]) -> None:
    world = make_world()
    committed = world.close()
    assert committed.clients == [] and committed.metrics["num_clients"] == 0.0
    assert_states_equal(world.global_state(1), world.global_state(0))


def test_round_closes_through_the_scheduler_when_all_updates_are_in(make_world: Callable[..., World]) -> None:
    world = make_world()
    for client in world.clients:
        world.aggregator.handle(world.announce(client))
        for event in drain(world.bus, world.queues.events):
            world.scheduler.handle_event(event)
    [close] = drain(world.bus, world.queues.aggregate)
    assert decode_aggregator(close) == CloseRound(job_id=world.job_id, round=1)
    world.aggregator.handle(close)
    [event] = drain(world.bus, world.queues.events)
    world.scheduler.handle_event(event)
    job = world.scheduler.get_job(world.job_id)
    assert job["state"] == JobState.RUNNING and job["round"] == 2
    assert [m["round"] for m in job["metrics"]] == [0, 1]
    tasks = [decode_task(body) for body in drain(world.bus, world.queues.tasks)]
    # Round 2 training tasks only.
    assert sum(isinstance(t, TrainTask) for t in tasks) == world.spec.clients_per_round
    assert not any(isinstance(t, EvaluateTask) for t in tasks)  # nothing personal: clients evaluate at the end


# --- exactly-once effect -------------------------------------------------------------------------


def test_duplicate_delivery_changes_nothing(make_world: Callable[..., World]) -> None:
    once, twice = make_world(), make_world()
    assert once.clients == twice.clients
    client = once.clients[0]

    once.aggregator.handle(once.announce(client))
    once.events()
    once.close()

    duplicates = received("duplicate")
    body = twice.announce(client)
    twice.aggregator.handle(body)
    twice.aggregator.handle(body)
    events = twice.events()
    assert [(e.client, e.merged_count) for e in events if isinstance(e, UpdateMerged)] == [(client, 1), (client, 1)]
    assert received("duplicate") == duplicates + 1
    assert twice.merged() == {client}
    committed = twice.close()
    assert committed.clients == [client] and committed.metrics["num_clients"] == 1.0
    assert_states_equal(twice.global_state(1), once.global_state(1))


def test_second_attempt_of_a_merged_client_is_a_duplicate(make_world: Callable[..., World]) -> None:
    world = make_world()
    client = world.clients[0]
    world.aggregator.handle(world.announce(client))
    world.aggregator.handle(world.announce(client, delta=world.delta(client, scale=5.0), attempt=1))
    [_, second] = world.events()
    assert isinstance(second, UpdateMerged) and second.merged_count == 1
    world.close()
    # Round 0 is still stored after committing round 1 (only round r >= 2 drops r - 2).
    expected = weighted_step(world.global_state(0), [world.delta(client)], [1.0])
    assert_states_close(world.global_state(1), expected)


# --- invalid updates --------------------------------------------------------------------------


def _nan_delta(world: World, client: int) -> State:
    delta = world.delta(client)
    name = sorted(delta)[0]
    delta[name].view(-1)[0] = float("nan")
    return delta


def _wrong_shape(world: World, client: int) -> State:
    delta = world.delta(client)
    name = next(n for n in delta if "lora_A" in n)
    delta[name] = torch.zeros(delta[name].shape[0] + 1, delta[name].shape[1])
    return delta


def _missing_tensor(world: World, client: int) -> State:
    delta = world.delta(client)
    del delta[sorted(delta)[-1]]
    return delta


def _extra_tensor(world: World, client: int) -> State:
    return {**world.delta(client), "base_model.model.bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}


@pytest.mark.parametrize(
    "corrupt", [_nan_delta, _wrong_shape, _missing_tensor, _extra_tensor], ids=["nan", "shape", "missing", "extra"]
)
def test_invalid_update_is_rejected_and_counted(
    make_world: Callable[..., World], corrupt: Callable[[World, int], State]
) -> None:
    world = make_world()
    client = world.clients[0]
    before = received("invalid")
    with pytest.raises(InvalidMessage, match="update"):
        world.aggregator.handle(world.announce(client, delta=corrupt(world, client)))
    assert received("invalid") == before + 1
    # The scheduler hears of it: the round need not wait for this client until its deadline.
    [rejected] = world.events()
    assert isinstance(rejected, UpdateInvalid)
    assert (rejected.client, rejected.merged_count, rejected.rejected_count) == (client, 0, 1)
    assert world.merged() == set()
    # The client is not poisoned: a good retry merges, and the bad one left no trace in the sum.
    world.aggregator.handle(world.announce(client, attempt=1))
    [merged] = world.events()
    assert isinstance(merged, UpdateMerged) and (merged.merged_count, merged.rejected_count) == (1, 0)
    world.close()
    assert_states_close(world.global_state(1), weighted_step(world.global_state(0), [world.delta(client)], [1.0]))


def test_update_whose_payload_is_missing_is_invalid(make_world: Callable[..., World]) -> None:
    world = make_world()
    client = world.clients[0]
    body = world.announce(client)
    world.store.delete(world.update_key(client))
    before = received("invalid")
    with pytest.raises(InvalidMessage, match="no stored update"):
        world.aggregator.handle(body)
    assert received("invalid") == before + 1


def test_update_with_garbage_payload_is_invalid(make_world: Callable[..., World]) -> None:
    world = make_world()
    client = world.clients[0]
    body = world.announce(client, blob=b"PWT1 not zstd")  # announced as it is: the codec refuses it
    before = received("invalid")
    with pytest.raises(InvalidMessage, match="update"):
        world.aggregator.handle(body)
    assert received("invalid") == before + 1


def test_update_key_must_match_job_round_and_client(make_world: Callable[..., World]) -> None:
    world = make_world()
    a, b = world.clients[:2]
    before = received("invalid")
    with pytest.raises(InvalidMessage, match="does not match"):
        world.aggregator.handle(world.announce(a, key=world.update_key(b)))
    assert received("invalid") == before + 1
    assert world.merged() == set()


def test_update_for_a_round_without_a_previous_global_is_invalid(make_world: Callable[..., World]) -> None:
    """An update for a round that has no starting state can never merge: invalid, not a transient error
    to retry MAX_FAILURES times (the uncommitted fwd rework raises RuntimeError from _global() here).
    """
    world = make_world()
    before = received("invalid")
    with pytest.raises(InvalidMessage):
        world.aggregator.handle(world.announce(world.clients[0], round_=3))
    assert world.merged(3) == set()
    assert received("invalid") == before + 1


@pytest.mark.parametrize("which", ["unsampled", "out-of-range"])
def test_update_from_a_client_outside_the_round_is_invalid(make_world: Callable[..., World], which: str) -> None:
    """Only the round's sampled clients may contribute; otherwise a stray update counts toward the
    scheduler's "all updates in" check and closes the round without a sampled client's update.

    Fails until Aggregator._merge checks `announce.client` against the round plan's clients.
    """
    world = make_world()
    outsider = next(c for c in range(world.spec.num_clients) if c not in world.clients)
    if which == "out-of-range":
        outsider = world.spec.num_clients + 5
    before = received("invalid")
    with contextlib.suppress(InvalidMessage):
        world.aggregator.handle(world.announce(outsider))
    assert world.merged() == set()
    assert [e for e in world.events() if isinstance(e, UpdateMerged)] == []
    assert received("invalid") == before + 1


# --- late updates ------------------------------------------------------------------------------


def test_late_update_after_commit_is_dropped(make_world: Callable[..., World]) -> None:
    world = make_world()
    early, late = world.clients[0], world.clients[1]
    world.aggregator.handle(world.announce(early))
    world.events()
    world.close()
    state = world.global_state(1)
    before = received("late")
    world.aggregator.handle(world.announce(late))
    assert received("late") == before + 1
    assert world.events() == []
    assert not world.store.exists(world.update_key(late))  # payload freed
    assert world.merged() == {early}
    assert_states_equal(world.global_state(1), state)
    assert world.close().clients == [early]


def test_update_for_a_cancelled_job_is_late(make_world: Callable[..., World]) -> None:
    world = make_world()
    world.aggregator.handle(world.announce(world.clients[0]))
    world.events()
    world.scheduler.cancel(world.job_id)
    [drop] = drain(world.bus, world.queues.aggregate)
    assert decode_aggregator(drop) == DropJob(job_id=world.job_id)
    world.aggregator.handle(drop)
    before = received("late")
    world.aggregator.handle(world.announce(world.clients[1]))
    assert received("late") == before + 1
    assert world.events() == []
    assert world.scheduler.jobs.state(world.job_id) == JobState.CANCELLED


def test_late_update_never_deletes_a_key_it_does_not_own(make_world: Callable[..., World]) -> None:
    """A stray or hostile announcement for a committed round must not delete arbitrary keys.

    Fails until the aggregator checks `announce.key` before the late-update path deletes it.
    """
    world = make_world()
    world.aggregator.handle(world.announce(world.clients[0]))
    world.events()
    world.close()
    victims = [
        world.keys.global_state(world.job_id, 1),
        world.keys.model_archive(world.job_id, "global"),
        world.keys.round_committed(world.job_id, 1),
    ]
    for victim in victims:
        body = encode(
            UpdateReady(
                job_id=world.job_id,
                round=1,
                client=world.clients[1],
                attempt=0,
                key=victim,
                num_samples=1,
                train_loss=0.0,
                compute_s=0.0,
                upload_bytes=0,
            )
        )
        with contextlib.suppress(InvalidMessage):
            world.aggregator.handle(body)
        assert world.store.exists(victim), f"a late announcement deleted {victim}"


# --- restart -----------------------------------------------------------------------------------


def test_restart_rebuilds_the_round_from_stored_updates(make_world: Callable[..., World]) -> None:
    reference, world = make_world(), make_world()
    assert reference.clients == world.clients
    *first, last = world.clients

    for client in world.clients:
        reference.aggregator.handle(reference.announce(client))
    reference.events()
    expected = reference.close()

    for client in first:
        world.aggregator.handle(world.announce(client))
    world.events()
    restarted = Aggregator(world.bus, world.store, cache_dir=world.cache_dir)  # the old one "died"
    # A redelivery of an update the dead process merged is a duplicate, not a second merge.
    restarted.handle(world.store.get(world.meta_key(first[0])) or b"")
    world.aggregator = restarted
    restarted.handle(world.announce(last))
    events = [e for e in world.events() if isinstance(e, UpdateMerged)]
    assert [(e.client, e.merged_count) for e in events] == [(first[0], len(first)), (last, len(world.clients))]
    committed = world.close()

    assert committed.clients == expected.clients
    assert_states_equal(world.global_state(1), reference.global_state(1))
    strip = lambda metrics: {k: v for k, v in metrics.items() if k not in TIMINGS}  # noqa: E731
    assert strip(committed.metrics) == strip(expected.metrics)


def test_restart_before_close_commits_what_was_merged(make_world: Callable[..., World]) -> None:
    world = make_world()
    for client in world.clients:
        world.aggregator.handle(world.announce(client))
    world.events()
    restarted = Aggregator(world.bus, world.store, cache_dir=world.cache_dir)
    committed = world.close(aggregator=restarted)
    assert committed.clients == sorted(world.clients)
    deltas = [world.delta(c) for c in world.clients]
    weights = [10.0 + 7 * c for c in world.clients]
    assert_states_close(world.global_state(1), weighted_step(world.global_state(0), deltas, weights))


# -- fwd mode: seed-scalar uploads ------------------------------------------------------------

FWD = {
    "mode": "fwd",
    "fwd": {
        "perturbations_per_task": 4,
        "candidates": 3,
        "discriminative": True,
        "variance_control": "adaptive",
        "variance_threshold": 0.2,
        "max_perturbations_per_step": 16,
        "lr": 0.1,
    },
}


def announce_seeds(
    world: World, client: int, indices: list[int], grads: list[float], wave: int = 0, claimed: int | None = None
) -> bytes:
    blob = encode_seed_scalars(indices, grads, [1.0] * len(indices))
    key = world.update_key(client, wave=wave)
    world.store.put(key, blob)
    message = encode(
        UpdateReady(
            job_id=world.job_id,
            round=1,
            client=client,
            attempt=0,
            wave=wave,
            key=key,
            digest=hashlib.sha256(blob).hexdigest(),
            num_samples=10,
            train_loss=1.0,
            compute_s=0.1,
            upload_bytes=len(blob),
            perturbations=len(indices) if claimed is None else claimed,
        )
    )
    world.store.put(world.meta_key(client, wave=wave), message)
    return message


@pytest.mark.parametrize(
    ("indices", "grads"),
    [
        ([0, 1, 2], [0.1, 0.2, 0.3]),  # wrong length
        ([0, 1, 2, 3], [0.1, float("nan"), 0.3, 0.4]),  # NaN
        ([0, 1, 2, 12], [0.1, 0.2, 0.3, 0.4]),  # unknown seed: only 4 x 3 candidates exist
    ],
)
def test_malformed_fwd_upload_is_rejected_and_the_round_commits_from_the_valid_ones(
    make_world: Callable[..., World], indices: list[int], grads: list[float]
) -> None:
    world = make_world(**FWD)
    bad, *good = world.clients
    invalid_before = received("invalid")
    with pytest.raises(InvalidMessage):
        world.aggregator.handle(announce_seeds(world, bad, indices, grads, claimed=4))
    assert received("invalid") == invalid_before + 1
    for client in good:
        world.aggregator.handle(announce_seeds(world, client, [0, 4, 7, 11], [0.5, -0.2, 0.1, 0.3]))
    world.aggregator.handle(encode(CloseRound(job_id=world.job_id, round=1, force=True)))
    committed = [e for e in world.events() if isinstance(e, RoundCommitted)]
    assert len(committed) == 1
    assert committed[0].clients == sorted(good)
    assert committed[0].metrics["perturbations"] == 4 * len(good)
    before, after = world.global_state(0), world.global_state(1)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fwd_commit_applies_sgd_on_the_regenerated_estimate(make_world: Callable[..., World]) -> None:
    world = make_world(**FWD)
    spec = world.spec
    start = world.global_state(0)
    space = ParamSpace.from_state(start)
    expected = torch.zeros(space.dim, dtype=torch.float64)
    uploads = {client: ([0, 5, 6, 9], [0.3, -0.1, 0.2 * client, 0.05]) for client in world.clients}
    for client, (indices, grads) in uploads.items():
        world.aggregator.handle(announce_seeds(world, client, indices, grads))
        for index, g in zip(indices, grads, strict=True):
            v = direction(candidate_seed(spec.seed, 1, client, 0, index), space.dim)
            expected += float(g) * v.double()
    world.aggregator.handle(encode(CloseRound(job_id=world.job_id, round=1, force=True)))
    mean = (expected / (4 * len(world.clients))).float()
    want = {k: start[k] - 0.1 * v for k, v in space.unflatten(mean).items()}
    got = world.global_state(1)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    gradient = decode_tensors(world.store.get(world.keys.artifact(world.job_id, "gradient", 1)) or b"")
    assert torch.allclose(space.flatten(gradient), mean, atol=1e-7)


def test_noisy_fwd_step_asks_for_more_work_until_the_cap(make_world: Callable[..., World]) -> None:
    world = make_world(**FWD)
    for client in world.clients:
        world.aggregator.handle(announce_seeds(world, client, [0, 1, 2, 3], [1.0, -1.0, 1.0, -1.0]))
    world.aggregator.handle(encode(CloseRound(job_id=world.job_id, round=1)))
    [event] = [e for e in world.events() if not isinstance(e, UpdateMerged)]
    assert isinstance(event, MoreWork) and event.wave == 1 and event.perturbations == 4 * len(world.clients)
    assert not world.store.exists(world.keys.round_committed(world.job_id, 1))
    # The scheduler turns it into a wave of tasks, bounded by the cap of 16 perturbations.
    world.scheduler.jobs.update_plan(world.job_id, 1, status=RoundStatus.CLOSING)
    world.scheduler.handle_event(encode(event))
    tasks = [decode_task(body) for body in drain(world.bus, world.queues.tasks)]
    assert [t.wave for t in tasks] == [1] * ((16 - 4 * len(world.clients)) // 4)
    assert all(t.perturbations == 4 for t in tasks)
