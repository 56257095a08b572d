"""Robust aggregation: each strategy against hand-computed values, the buffer's memory bound, the spec's
rules, poisoned-client simulation, and tiny-bert jobs where FedAvg breaks and robust strategies hold."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY

from services.embedded import EmbeddedCluster
from shared.codec import Codec, decode_tensors, encode_update
from shared.messages import UpdateReady
from shared.modes.backprop import DeltaAccumulator
from shared.modes.base import UpdateRejected
from shared.registry import STRATEGIES
from shared.robust import (
    BufferedUpdates,
    BufferFull,
    ClippedMean,
    krum_select,
    l2_norm,
    poison_delta,
    poisoned_clients,
)
from shared.spec import JobSpec, SpecError, parse_spec
from shared.store import Keys
from tests.conftest import TINY

State = dict[str, torch.Tensor]


def spec_with(tiny_spec: Callable[..., JobSpec], strategy: str, **robust: Any) -> JobSpec:
    return tiny_spec(aggregation={"strategy": strategy, "robust": robust})


def apply(spec: JobSpec, updates: list[State], weights: list[float] | None = None) -> State:
    """The strategy's new state from a zero state (so the result is the aggregated delta)."""
    strategy = STRATEGIES[spec.aggregation.strategy]
    aggregate = strategy.start(spec)
    for update, weight in zip(updates, weights or [1.0] * len(updates), strict=True):
        aggregate.add(update, weight)
    zero = {name: torch.zeros_like(t) for name, t in updates[0].items()}
    return strategy.apply(spec, {**zero, "personal": torch.ones(2)}, aggregate)


def rows(*values: list[float]) -> list[State]:
    return [{"w": torch.tensor(v)} for v in values]


# -- each strategy against hand-computed values ------------------------------------------------------


def test_median_odd_and_even_counts(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = spec_with(tiny_spec, "median")
    odd = apply(spec, rows([1.0, -5.0], [3.0, 0.0], [100.0, 2.0]))
    assert torch.equal(odd["w"], torch.tensor([3.0, 0.0]))
    # Even: the mean of the two middle values.
    even = apply(spec, rows([1.0, 8.0], [2.0, 4.0], [4.0, 0.0], [1000.0, -2.0]))
    assert torch.equal(even["w"], torch.tensor([3.0, 2.0]))


def test_trimmed_mean_drops_the_ends_per_coordinate(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = spec_with(tiny_spec, "trimmed_mean", trim_fraction=0.34)
    # floor(0.34 x 5) = 1 per side: column 0 keeps {1, 2, 3}, column 1 keeps {10, 20, 30}.
    result = apply(spec, rows([1.0, 30.0], [2.0, -1000.0], [3.0, 10.0], [-50.0, 20.0], [99.0, 1000.0]))
    assert torch.allclose(result["w"], torch.tensor([2.0, 20.0]))


def test_clip_scales_each_update_to_the_bound_then_averages(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = spec_with(tiny_spec, "clip", clip_norm=1.0)
    # Norms 5 (clipped to (0.6, 0.8)) and 0.5 (kept): the mean is (0.45, 0.6).
    big = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    small = {"a": torch.tensor([0.3]), "b": torch.tensor([0.4])}
    result = apply(spec, [big, small])
    assert torch.allclose(result["a"], torch.tensor([0.45])) and torch.allclose(result["b"], torch.tensor([0.6]))
    aggregate = STRATEGIES["clip"].start(spec)
    assert isinstance(aggregate, ClippedMean)
    aggregate.add({"a": torch.tensor([3.0, 4.0])}, 1.0)
    assert aggregate.clipped == 1


def test_krum_scores_by_nearest_neighbours(tiny_spec: Callable[..., JobSpec]) -> None:
    # Points 0, 1, 2, 3 and an outlier at 100 on a line; f = 1: each score sums the n - f - 2 = 2 nearest
    # squared distances: 0 -> 1 + 4 = 5, 1 -> 1 + 1 = 2, 2 -> 1 + 1 = 2, 3 -> 1 + 4 = 5, 100 -> 97^2 + 98^2.
    buffer = BufferedUpdates(1 << 20)
    for value in (3.0, 100.0, 1.0, 0.0, 2.0):
        buffer.add({"w": torch.tensor([value])}, 1.0)
    assert krum_select(buffer, byzantine=1, selected=1) == [2]  # the 1 (arrived third) ties with 2: arrival order
    assert sorted(krum_select(buffer, byzantine=1, selected=4)) == [0, 2, 3, 4]  # everything but the outlier
    spec = spec_with(tiny_spec, "krum", byzantine=0, krum_selected=2)
    result = apply(spec, rows([0.0], [1.0], [2.0]))
    # f = 0, one neighbour each: the scores tie at 1, so the first two arrivals are averaged.
    assert torch.allclose(result["w"], torch.tensor([0.5]))


def test_krum_lowers_f_when_fewer_updates_arrive() -> None:
    buffer = BufferedUpdates(1 << 20)
    for value in (0.0, 1.0, 50.0):
        buffer.add({"w": torch.tensor([value])}, 1.0)
    # n = 3 supports f = 0 only: one neighbour each (0 -> 1, 1 -> 1, 50 -> 49^2); m capped at n - f.
    assert krum_select(buffer, byzantine=5, selected=10) == [0, 1, 2]
    assert krum_select(buffer, byzantine=5, selected=1) == [0]


def test_server_lr_and_personal_tensors(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = tiny_spec(aggregation={"strategy": "median", "server_lr": 0.5})
    result = apply(spec, rows([2.0], [4.0], [6.0]))
    assert torch.equal(result["w"], torch.tensor([2.0]))
    assert torch.equal(result["personal"], torch.ones(2))  # no delta: kept


@pytest.mark.parametrize("strategy", ["clip", "median", "trimmed_mean", "krum"])
def test_self_reported_weights_cannot_dominate(tiny_spec: Callable[..., JobSpec], strategy: str) -> None:
    spec = spec_with(tiny_spec, strategy, clip_norm=100.0, byzantine=0, krum_selected=3, trim_fraction=0.34)
    updates = rows([1.0], [2.0], [3.0])
    honest = apply(spec, updates)
    forged = apply(spec, updates, weights=[1.0, 1.0, 100_000.0])  # issue 12's forged num_samples
    assert torch.equal(honest["w"], forged["w"])
    assert torch.allclose(honest["w"], torch.tensor([2.0]))


def test_non_finite_updates_are_refused_before_anything_is_added(tiny_spec: Callable[..., JobSpec]) -> None:
    for strategy in ("fedavg", "clip", "median"):
        aggregate = STRATEGIES[strategy].start(spec_with(tiny_spec, strategy))
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="NaN or infinite"):
                aggregate.add({"w": torch.tensor([1.0, bad])}, 1.0)
        assert aggregate.count == 0


# -- the buffered strategies' memory bound -------------------------------------------------------


def test_buffer_rejects_the_update_past_its_bound() -> None:
    buffer = BufferedUpdates(max_bytes=3 * 4 * 10)  # three updates of 10 float32
    for i in range(3):
        buffer.add({"w": torch.full((10,), float(i))}, 1.0)
    with pytest.raises(BufferFull, match="max_buffer_mb"):
        buffer.add({"w": torch.zeros(10)}, 1.0)
    assert (buffer.count, buffer.bytes) == (3, 120)


def test_accumulator_rejects_past_the_bound_and_commits_from_the_buffered(tiny_spec: Callable[..., JobSpec]) -> None:
    state = {"global.weight": torch.zeros(256)}  # 1 KiB of float32 per update
    spec = tiny_spec(aggregation={"strategy": "median", "robust": {"max_buffer_mb": 2.5 / 1024}})
    accumulator = DeltaAccumulator(spec, state)

    def upload(value: float, client: int) -> tuple[UpdateReady, bytes]:
        blob = encode_update({"global.weight": torch.full((256,), value)}, Codec.for_uploads(spec.compression), 0).blob
        announce = UpdateReady(
            job_id="tiny-0123456789",
            round=1,
            client=client,
            attempt=0,
            key="k",
            num_samples=1,
            train_loss=0.0,
            compute_s=0.0,
            upload_bytes=len(blob),
        )
        return announce, blob

    for client, value in enumerate((1.0, 3.0)):
        announce, blob = upload(value, client)
        accumulator.merge(announce, accumulator.validate(announce, blob, 1 << 20))
    announce, blob = upload(2.0, 2)
    with pytest.raises(UpdateRejected, match=r"max_buffer_mb"):
        accumulator.validate(announce, blob, 1 << 20)
    step = accumulator.commit(state, lambda _: None, 1)
    assert torch.allclose(step.state["global.weight"], torch.full((256,), 2.0))  # median of {1, 3}


# -- the spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aggregation": {"strategy": "krum", "robust": {"byzantine": 3}}}, "byzantine can be at most 2"),
        ({"aggregation": {"strategy": "krum", "robust": {"byzantine": 2, "krum_selected": 7}}}, "krum_selected"),
        ({"clients_per_round": 2, "aggregation": {"strategy": "krum", "robust": {"byzantine": 0}}}, "at least 3"),
        ({"aggregation": {"strategy": "trimmed_mean", "robust": {"trim_fraction": 0.1}}}, "trims none"),
        ({"aggregation": {"strategy": "trimmed_mean", "robust": {"trim_fraction": 0.5}}}, "trim_fraction"),
        ({"aggregation": {"strategy": "clip", "robust": {"clip_norm": 0}}}, "clip_norm"),
        ({"aggregation": {"strategy": "median", "robust": {"max_buffer_mb": 1e9}}}, "max_buffer_mb"),
        ({"aggregation": {"strategy": "bulyan"}}, "unknown aggregation strategy"),
        ({"mode": "fwd", "aggregation": {"strategy": "median"}}, "fwd.regime 'local'"),
        ({"mode": "fwd", "simulation": {"poison": {"fraction": 0.5}}}, "simulation.poison"),
        ({"simulation": {"poison": {"fraction": 0.5, "kind": "virus"}}}, "simulation.poison.kind"),
    ],
)
def test_spec_says_what_is_wrong(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({**TINY, "num_clients": 8, "clients_per_round": 8, **overrides})


def test_spec_accepts_the_documented_settings() -> None:
    spec = parse_spec(
        {
            **TINY,
            "num_clients": 8,
            "clients_per_round": 8,
            "aggregation": {"strategy": "krum", "robust": {"byzantine": 2, "krum_selected": 6}},
        }
    )
    assert spec.aggregation.robust.byzantine == 2
    assert parse_spec({**TINY, "mode": "fwd", "fwd": {"regime": "local"}, "aggregation": {"strategy": "median"}})


# -- poisoned clients (simulation) ---------------------------------------------------------------


def test_poisoned_clients_are_drawn_from_the_seed(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = tiny_spec(num_clients=10, clients_per_round=10, simulation={"poison": {"fraction": 0.2}})
    chosen = poisoned_clients(spec)
    assert len(chosen) == 2 and chosen <= set(range(10))
    assert poisoned_clients(spec) == chosen
    assert poisoned_clients(tiny_spec()) == frozenset()


@pytest.mark.parametrize("kind", ["nan", "scale", "sign_flip", "noise"])
def test_poison_kinds(tiny_spec: Callable[..., JobSpec], kind: str) -> None:
    spec = tiny_spec(simulation={"poison": {"fraction": 0.5, "kind": kind, "scale": 10.0}})
    delta = {"w": torch.linspace(-2.0, 3.0, 1000)}
    bad = poison_delta(spec, delta, seed=3)["w"]
    expected = {"scale": delta["w"] * 10, "sign_flip": -delta["w"]}
    if kind == "nan":
        assert bool(bad.isnan().all())
    elif kind == "noise":
        assert torch.equal(bad, poison_delta(spec, delta, seed=3)["w"])  # seeded
        assert 9 < float(bad.std()) / float(delta["w"].square().mean().sqrt()) < 11
    else:
        assert torch.equal(bad, expected[kind])


# -- tiny-bert jobs: poisoned clients break FedAvg, not the robust strategies ------------------------


@dataclass
class Outcome:
    job: dict[str, Any]
    final: State
    before_final: State
    """The global state one round before the end."""
    wall_s: float


def run_job(spec: JobSpec, cache_dir: Path) -> Outcome:
    began = time.perf_counter()
    with EmbeddedCluster(cache_dir) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, poll_s=0.05)
        blob = cluster.store.get(Keys().global_state(job_id, spec.rounds))
        before = cluster.store.get(Keys().global_state(job_id, spec.rounds - 1))
    assert job["state"] == "succeeded", job.get("error")
    assert blob is not None and before is not None
    return Outcome(job, decode_tensors(blob), decode_tensors(before), time.perf_counter() - began)


JOB: dict[str, Any] = {"num_clients": 6, "clients_per_round": 6, "rounds": 2, "local_steps": 2}
ROBUST = {"byzantine": 1, "krum_selected": 3, "trim_fraction": 0.2}


@pytest.fixture(scope="module")
def clean(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> Outcome:
    return run_job(tiny_spec(**JOB), cache_dir)


def poisoned(tiny_spec: Callable[..., JobSpec], strategy: str, kind: str) -> JobSpec:
    return tiny_spec(
        **JOB,
        aggregation={"strategy": strategy, "robust": ROBUST},
        simulation={"poison": {"fraction": 0.2, "kind": kind, "scale": 1000.0}},
    )


def distance(a: State, b: State) -> float:
    return l2_norm({name: a[name] - b[name] for name in a})


def test_scaled_clients_wreck_fedavg_but_not_robust_strategies(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path, clean: Outcome
) -> None:
    assert len(poisoned_clients(poisoned(tiny_spec, "fedavg", "scale"))) == 1
    moved = distance(clean.final, clean.before_final)  # how far a clean round moves the model
    fedavg = run_job(poisoned(tiny_spec, "fedavg", "scale"), cache_dir)
    # One client in six sends its delta x1000: the mean moves ~170x as far as a clean round does.
    assert distance(fedavg.final, clean.final) > 20 * moved
    fedavg_loss = fedavg.job["metrics"][-1]["loss"]
    for strategy in ("median", "krum"):
        robust = run_job(poisoned(tiny_spec, strategy, "scale"), cache_dir)
        assert distance(robust.final, clean.final) < 3 * moved, strategy
        loss = robust.job["metrics"][-1]["loss"]
        assert loss < fedavg_loss and loss < 1.05 * clean.job["metrics"][-1]["loss"], strategy


def test_nan_updates_are_rejected_counted_and_the_round_commits_from_the_valid_ones(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path
) -> None:
    spec = poisoned(tiny_spec, "fedavg", "nan")
    bad = poisoned_clients(spec)
    before = REGISTRY.get_sample_value("pwff_updates_received_total", {"outcome": "invalid"}) or 0.0
    outcome = run_job(spec, cache_dir)
    after = REGISTRY.get_sample_value("pwff_updates_received_total", {"outcome": "invalid"}) or 0.0
    assert after - before == len(bad) * spec.rounds
    for record in outcome.job["metrics"][1:]:
        assert record["rejected"] == len(bad)
        assert record["updates"] == spec.clients_per_round - len(bad)
    assert all(bool(t.isfinite().all()) for t in outcome.final.values())
    # The rounds closed when the last valid update merged, not at the 900 s deadline.
    assert outcome.wall_s < spec.round_deadline_s / 4
