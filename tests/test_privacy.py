"""Client-level differential privacy (shared.privacy): clipping, noise scale, the accountant, a DP job end to end."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from prometheus_client import REGISTRY

from services.embedded import EmbeddedCluster
from services.results import plot_metrics
from services.scheduler.views import JobView
from shared import privacy
from shared.modes.backprop import DeltaAccumulator
from shared.spec import JobSpec, SpecError, parse_spec
from tests.conftest import TINY

PRIVATE: dict[str, Any] = {"clip_norm": 0.5, "noise_multiplier": 1.2}


def _private(tiny_spec: Callable[..., JobSpec], **privacy_fields: Any) -> JobSpec:
    return tiny_spec(aggregation={"weighting": "uniform"}, privacy={**PRIVATE, **privacy_fields})


def _update(seed: int, scale: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 8, generator=generator) * scale,
        "b.bias": torch.randn(8, generator=generator) * scale,
    }


# -- clipping and noise -----------------------------------------------------------------------


def test_clip_scales_a_long_update_to_exactly_the_clip_norm() -> None:
    update = _update(0, 3.0)
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in update.values()))
    clipped, seen = privacy.clip(update, 0.5)
    assert seen == pytest.approx(norm, rel=1e-12)
    assert privacy.l2_norm(clipped) == pytest.approx(0.5, rel=1e-12)
    for name, tensor in update.items():  # a scaling: same direction
        assert torch.allclose(clipped[name], tensor.double() * (0.5 / norm), rtol=1e-12, atol=0)


def test_clip_leaves_a_short_update_and_a_zero_update_alone() -> None:
    update = _update(1, 0.01)
    clipped, norm = privacy.clip(update, 10.0)
    assert norm < 10
    assert all(torch.equal(clipped[n], update[n].double()) for n in update)
    zero = {"w": torch.zeros(3)}
    assert torch.equal(privacy.clip(zero, 1.0)[0]["w"], torch.zeros(3, dtype=torch.float64))


def test_noise_has_the_asked_standard_deviation_and_is_reproducible() -> None:
    like = {"w": torch.zeros(400, 500), "v": torch.zeros(1000)}
    noise = privacy.gaussian_noise(like, 0.3, seed=5)
    values = torch.cat([t.flatten() for t in noise.values()])
    # 201,000 draws: the sample std is within 0.5% of 0.3 with overwhelming probability (its sd is 0.16%).
    assert float(values.std()) == pytest.approx(0.3, rel=5e-3)
    assert abs(float(values.mean())) < 0.3 * 5 / math.sqrt(values.numel())
    again = privacy.gaussian_noise(like, 0.3, seed=5)
    assert all(torch.equal(noise[n], again[n]) for n in like)
    assert not torch.equal(privacy.gaussian_noise(like, 0.3, seed=6)["w"], noise["w"])


def test_server_noise_dp_fedavg_against_a_hand_computed_step(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = _private(tiny_spec, noise_multiplier=0.8)
    state = {"a.weight": torch.ones(4, 8), "b.bias": torch.zeros(8), "personal": torch.full((2,), 7.0)}
    updates = [_update(10, 2.0), _update(11, 0.001)]  # one clipped, one not
    aggregate = privacy.PrivateSum(spec.privacy)  # type: ignore[arg-type]
    for update in updates:
        aggregate.add(update, weight=1234.0)  # a sample count is ignored: every client weighs 1
    committed = privacy.commit(spec, state, aggregate, round_=2)

    c, z, n = 0.5, 0.8, spec.clients_per_round
    total = {name: torch.zeros_like(state[name], dtype=torch.float64) for name in updates[0]}
    for update in updates:
        norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in update.values()))
        for name, tensor in update.items():
            total[name] += tensor.double() * min(1.0, c / norm)
    noise = privacy.gaussian_noise(total, z * c, privacy.noise_seed(spec, "server", 2))
    for name in total:
        expected = (state[name].double() + ((total[name] + noise[name]) / n).float().double()).float()
        assert torch.equal(committed.state[name], expected), name
    assert torch.equal(committed.state["personal"], state["personal"])
    figures = committed.figures
    assert figures["dp_noise_std"] == pytest.approx(z * c / n)
    assert figures["dp_clipped_fraction"] == 0.5
    assert figures["dp_epsilon"] == privacy.epsilon(spec, 2)


def test_server_noise_on_the_average_has_std_z_c_over_n(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = _private(tiny_spec, clip_norm=2.0, noise_multiplier=0.7)
    zeros = {"w": torch.zeros(300, 300)}
    aggregate = privacy.PrivateSum(spec.privacy)  # type: ignore[arg-type]
    aggregate.add(zeros, 1.0)
    moved = privacy.commit(spec, zeros, aggregate, round_=1).state["w"]
    assert float(moved.double().std()) == pytest.approx(0.7 * 2.0 / spec.clients_per_round, rel=1e-2)


def test_client_noise_clips_and_adds_a_share_of_the_sum_noise(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = _private(tiny_spec, noise="client", clip_norm=1.0, noise_multiplier=1.5)
    delta = {"w": torch.full((200, 200), 0.5)}  # norm 100: clipped to 1
    noised = privacy.privatize_client(spec, delta, round_=3, client=2)
    share = noised["w"].double() - delta["w"].double() * (1.0 / 100.0)
    assert float(share.std()) == pytest.approx(1.5 * 1.0 / math.sqrt(spec.clients_per_round), rel=1e-2)
    # Summed over a full round the shares carry the server-side noise's variance, (z C)^2.
    shares = [privacy.privatize_client(spec, {"w": torch.zeros(200, 200)}, 3, c)["w"] for c in range(3)]
    assert float(sum(shares).double().std()) == pytest.approx(1.5, rel=1e-2)  # type: ignore[union-attr]
    # The same task noises the same way (a retried task must not give a second, independent draw).
    assert torch.equal(privacy.privatize_client(spec, delta, 3, 2)["w"], noised["w"])
    # Client-side, the server neither clips nor noises again: a plain sum over n.
    aggregate = privacy.PrivateSum(spec.privacy)  # type: ignore[arg-type]
    aggregate.add(noised, 1.0)
    step = privacy.commit(spec, {"w": torch.zeros(200, 200)}, aggregate, round_=3)
    assert torch.equal(step.state["w"], (noised["w"].double() / spec.clients_per_round).float())
    assert "dp_clipped_fraction" not in step.figures


def test_noise_key_changes_every_draw(tiny_spec: Callable[..., JobSpec], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _private(tiny_spec)
    plain = privacy.noise_seed(spec, "server", 1)
    monkeypatch.setenv("PWFF_DP_NOISE_KEY", "a deployment secret")
    keyed = privacy.noise_seed(spec, "server", 1)
    assert keyed != plain
    assert privacy.noise_seed(spec, "server", 1) == keyed


def test_the_accumulator_merges_through_dp_fedavg(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = _private(tiny_spec)
    state = {"a.weight": torch.zeros(4, 8), "b.bias": torch.zeros(8)}
    accumulator = DeltaAccumulator(spec, state)
    assert isinstance(accumulator.aggregate, privacy.PrivateSum)
    plain = DeltaAccumulator(tiny_spec(), state)
    assert not isinstance(plain.aggregate, privacy.PrivateSum)


# -- the accountant ---------------------------------------------------------------------------


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.75, 1.2, 2), (1.0, 0.7, 10), (0.1, 1.0, 100)])
def test_epsilon_is_dp_accountings_own(q: float, z: float, rounds: int) -> None:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    rdp = rdp_privacy_accountant.RdpAccountant(list(privacy._RDP_ORDERS)).compose(event).get_epsilon(1e-5)
    pld = pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(1e-5)
    assert privacy.accountant_epsilon(q, z, rounds, 1e-5) == rdp
    # The integer orders lose little against the library's default set, and PLD is the tighter bound.
    default = rdp_privacy_accountant.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert default <= rdp <= default * 1.05
    assert pld <= rdp


def test_epsilon_of_the_full_gaussian_mechanism_by_hand() -> None:
    # q = 1: T rounds of the Gaussian mechanism have RDP T a / (2 z^2) at order a, and dp-accounting converts
    # RDP to (epsilon, delta) with Balle et al. (2020): eps = rdp + log((a-1)/a) - (log(delta) + log(a)) / (a-1).
    z, rounds, delta = 2.0, 5, 1e-5
    by_hand = min(
        rounds * a / (2 * z * z) + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a in privacy._RDP_ORDERS
    )
    assert privacy.accountant_epsilon(1.0, z, rounds, delta) == pytest.approx(by_hand, rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    eps = [privacy.accountant_epsilon(0.5, 1.0, r, 1e-5) for r in range(1, 6)]
    assert eps == sorted(eps) and len(set(eps)) == 5
    assert privacy.accountant_epsilon(0.5, 2.0, 5, 1e-5) < eps[-1]
    assert privacy.accountant_epsilon(0.5, 0.0, 5, 1e-5) == math.inf
    assert privacy.accountant_epsilon(0.5, 1.0, 0, 1e-5) == 0.0
    assert privacy.accountant_epsilon(0.5, 1e-300, 10, 1e-5) == math.inf  # z^2 underflows: no bound


def test_epsilon_is_quick_for_any_spec_the_api_accepts() -> None:
    # The job view computes it on request: the extremes of the spec's ranges must not stall the scheduler.
    began = time.perf_counter()
    for q, z, rounds, delta in [(1e-4, 1e-9, 10_000, 1e-5), (1.0, 100.0, 10_000, 5e-324), (1.0, 1e-3, 10_000, 0.99)]:
        assert privacy.accountant_epsilon(q, z, rounds, delta) > 0
    assert time.perf_counter() - began < 10


# -- the spec -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy": PRIVATE}, "weighting 'uniform'"),
        ({"privacy": {**PRIVATE, "clip_norm": 0}}, "privacy.clip_norm"),
        ({"privacy": {**PRIVATE, "noise_multiplier": -1}}, "privacy.noise_multiplier"),
        ({"privacy": {**PRIVATE, "delta": 1}}, "privacy.delta"),
        ({"privacy": {"clip_norm": 1}}, "privacy.noise_multiplier"),
        ({"privacy": {**PRIVATE, "noise": "both"}}, "privacy.noise"),
        ({"privacy": {**PRIVATE, "accountant": "pld"}}, "privacy.accountant"),
        ({"privacy": PRIVATE, "aggregation": {"weighting": "uniform"}, "mode": "fwd"}, "fedsgd"),
        (
            {"privacy": {**PRIVATE, "noise": "client"}, "aggregation": {"weighting": "uniform"}, "mode": "auto"},
            "backprop or align",
        ),
    ],
)
def test_the_spec_rejects_what_dp_fedavg_cannot_bound(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({**TINY, **overrides})


def test_privacy_is_off_by_default_and_composes_with_fwd_local(tiny_spec: Callable[..., JobSpec]) -> None:
    assert tiny_spec().privacy is None
    spec = tiny_spec(mode="fwd", fwd={"regime": "local"}, aggregation={"weighting": "uniform"}, privacy=PRIVATE)
    assert spec.privacy is not None and spec.privacy.noise == "server" and spec.privacy.delta == 1e-5


# -- a DP job end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["server", "client"])
def test_embedded_dp_job_reports_epsilon_per_round(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path, tmp_path: Path, noise: str
) -> None:
    spec = tiny_spec(rounds=3, aggregation={"weighting": "uniform"}, privacy={**PRIVATE, "noise": noise})
    with EmbeddedCluster(cache_dir) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, poll_s=0.05)
        gauge = REGISTRY.get_sample_value("pwff_dp_epsilon", {"job_id": job_id})
    assert job["state"] == "succeeded", job.get("error")
    epsilons = [round_["dp_epsilon"] for round_ in job["metrics"][1:]]
    assert epsilons == [privacy.epsilon(spec, r) for r in (1, 2, 3)]
    assert all(0 < a < b for a, b in itertools.pairwise(epsilons))
    assert "dp_epsilon" not in job["metrics"][0]
    assert gauge == epsilons[-1]
    view = JobView.model_validate(job)
    assert view.privacy is not None
    assert view.privacy.epsilon_spent == view.privacy.epsilon_total == epsilons[-1]
    assert view.privacy.sampling_rate == 0.75 and view.privacy.delta == 1e-5
    dumped = view.model_dump(mode="json")
    assert dumped["metrics"][2]["dp_epsilon"] == epsilons[1]
    if noise == "server":
        assert 0 <= dumped["metrics"][1]["dp_clipped_fraction"] <= 1
    plot_metrics(job, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").stat().st_size > 0


def test_a_job_without_noise_reports_an_unbounded_epsilon_as_null(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = _private(tiny_spec, noise_multiplier=0.0)
    view = privacy.privacy_view(spec, [])
    assert view is not None and view["epsilon_spent"] == 0.0 and view["epsilon_total"] == math.inf
    # The API answers in JSON, where a figure that is not finite is null.
    rendered = JobView.model_validate(
        {
            "id": "j",
            "name": "j",
            "state": "running",
            "round": 1,
            "created_at": 0.0,
            "rounds": 2,
            "updated_at": 0.0,
            "error": None,
            "spec": spec.model_dump(mode="json"),
            "metrics": [{"round": 1, "clients": [0], "accuracy": 0.5, "loss": 1.0, "dp_epsilon": math.inf}],
            "privacy": view,
        }
    ).model_dump_json()
    rendered = json.loads(rendered)
    assert rendered["privacy"]["epsilon_total"] is None
    assert rendered["metrics"][0]["dp_epsilon"] is None


def test_the_cli_summary_says_the_epsilon_spent() -> None:
    from services import cli

    job = {
        "id": "j",
        "state": "succeeded",
        "metrics": [{"accuracy": 0.5}],
        "privacy": {"epsilon_spent": 3.21, "delta": 1e-5},
    }
    with cli.console.capture() as captured:
        cli._summary(job)
    assert "privacy epsilon 3.21 at delta 1e-05" in " ".join(captured.get().split())  # rich wraps lines
    job["privacy"] = {"epsilon_spent": None, "delta": 1e-5}
    with cli.console.capture() as captured:
        cli._summary(job)
    assert "privacy epsilon unbounded" in captured.get()
