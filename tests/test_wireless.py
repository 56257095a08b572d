"""The wireless delay/energy model: formulas against hand arithmetic, budgets, device populations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from shared import wireless as w
from shared.wireless import DevicePopulation, DeviceProfile, DevicesSpec

# B = 1 MHz, p = 0.1 W, L = 100 dB, |h|^2 = 1, N0 = -174 dBm/Hz.
REFERENCE = DeviceProfile(
    bandwidth_hz=1e6,
    tx_power_w=0.1,
    path_loss_db=100.0,
    fading=1.0,
    noise_psd_dbm_hz=-174.0,
    flops_per_s=2e11,
    joules_per_flop=3e-11,
)


def test_shannon_rate_by_hand() -> None:
    # N0 = 10^((-174 - 30) / 10) W/Hz = 10^-20.4 = 3.981e-21 W/Hz
    assert w.noise_w_per_hz(REFERENCE) == pytest.approx(3.981071705534973e-21)
    # noise power N0 * B = 3.981e-21 * 1e6 = 3.981e-15 W
    # gain g = 1 * 10^(-100/10) = 1e-10; received power p * g = 0.1 * 1e-10 = 1e-11 W
    assert w.channel_gain(REFERENCE) == pytest.approx(1e-10)
    # SNR = 1e-11 / 3.981e-15 = 2511.886 (= 10^3.4, i.e. 34 dB)
    assert w.snr(REFERENCE) == pytest.approx(2511.886, rel=1e-6)
    # rate = 1e6 * log2(1 + 2511.886) = 1e6 * log2(2512.886) = 1e6 * 11.29513 = 11.295 Mbit/s
    assert w.uplink_rate_bps(REFERENCE) == pytest.approx(11.29513e6, rel=1e-6)


def test_rate_grows_with_bandwidth_power_and_gain_and_drops_with_loss() -> None:
    base = w.uplink_rate_bps(REFERENCE)
    assert w.uplink_rate_bps(REFERENCE.model_copy(update={"bandwidth_hz": 2e6})) > base
    assert w.uplink_rate_bps(REFERENCE.model_copy(update={"tx_power_w": 0.2})) > base
    assert w.uplink_rate_bps(REFERENCE.model_copy(update={"fading": 2.0})) > base
    assert w.uplink_rate_bps(REFERENCE.model_copy(update={"path_loss_db": 120.0})) < base
    # 30 dB more loss: SNR = 2511.886 / 1000 = 2.512, rate = 1e6 * log2(3.512) = 1.8123 Mbit/s
    assert w.uplink_rate_bps(REFERENCE.model_copy(update={"path_loss_db": 130.0})) == pytest.approx(1.8123e6, rel=1e-4)


def test_upload_delay_and_energy_of_one_megabyte() -> None:
    # 1 MB = 1e6 bytes = 8e6 bits; 8e6 / 11.29513e6 bit/s = 0.70827 s
    assert w.upload_delay_s(1_000_000, REFERENCE) == pytest.approx(0.708270, rel=1e-5)
    # energy = p * t = 0.1 W * 0.70827 s = 0.070827 J
    assert w.upload_energy_j(1_000_000, REFERENCE) == pytest.approx(0.0708270, rel=1e-5)
    assert w.upload_delay_s(0, REFERENCE) == 0.0
    with pytest.raises(ValueError, match="num_bytes"):
        w.upload_delay_s(-1, REFERENCE)


def test_compute_time_and_energy() -> None:
    # 1e12 FLOP at 2e11 FLOP/s = 5 s; 1e12 FLOP * 3e-11 J/FLOP = 30 J
    assert w.compute_time_s(1e12, REFERENCE) == pytest.approx(5.0)
    assert w.compute_energy_j(1e12, REFERENCE) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="flops"):
        w.compute_time_s(float("nan"), REFERENCE)


def test_flop_counts() -> None:
    # SmolLM2-135M, a batch of 8 x 256 = 2048 tokens: forward = 2 * 135e6 * 2048 = 5.5296e11 FLOP
    assert w.forward_flops(135_000_000, 2048) == 552_960_000_000
    # full-FT backprop = 3 x forward = 1.65888e12; a forward-gradient perturbation = 2 x forward = 1.10592e12
    assert w.backprop_step_flops(135_000_000, 2048) == 1_658_880_000_000
    assert w.fwd_perturbation_flops(135_000_000, 2048) == 1_105_920_000_000
    with pytest.raises(ValueError):
        w.forward_flops(-1, 10)


def test_backprop_flops_price_weight_gradients_of_trainable_parameters_only() -> None:
    n, t = 22_700_000, 16 * 48
    forward = w.forward_flops(n, t)
    # forward 2NT + activation gradients 2NT + weight gradients 2 N_trainable T
    assert w.backprop_step_flops(n, t, n) == 6 * n * t == 3 * forward
    assert w.backprop_step_flops(n, t, 0) == 4 * n * t == 2 * forward
    lora = 150_000
    assert w.backprop_step_flops(n, t, lora) == 4 * n * t + 2 * lora * t
    assert w.backprop_step_flops(n, t, lora) / w.backprop_step_flops(n, t) == pytest.approx(2 / 3, rel=0.01)
    with pytest.raises(ValueError, match="trainable"):
        w.backprop_step_flops(n, t, n + 1)
    with pytest.raises(ValueError, match="trainable"):
        w.backprop_step_flops(n, t, -1)


def test_backprop_mode_prices_lora_below_full_fine_tuning() -> None:
    from shared.modes.backprop import BackpropMode
    from shared.spec import parse_spec

    base = {"name": "t", "model": "minilm-l6", "dataset": "tweets-sentiment"}
    lora, full = parse_spec(base), parse_spec({**base, "lora": {"full": True}})
    mode, n, t = BackpropMode(), 22_700_000, 768
    assert mode.unit_flops(full, n, t) == 6 * n * t
    assert mode.unit_flops(lora, n, t) == 4 * n * t
    # forward-gradient perturbations are priced as before: two forwards
    assert w.fwd_perturbation_flops(n, t) == 4 * n * t


def test_round_cost_adds_compute_and_upload() -> None:
    cost = w.round_cost(REFERENCE, flops=1e12, upload_bytes=1_000_000)
    assert cost.compute_s == pytest.approx(5.0)
    assert cost.upload_s == pytest.approx(0.708270, rel=1e-5)
    assert cost.total_s == pytest.approx(5.708270, rel=1e-6)
    assert cost.compute_j == pytest.approx(30.0)
    assert cost.upload_j == pytest.approx(0.0708270, rel=1e-5)
    assert cost.total_j == pytest.approx(30.0708270, rel=1e-7)
    assert cost.rate_bps == pytest.approx(11.29513e6, rel=1e-6)


def test_budget_by_hand() -> None:
    one_second_steps = REFERENCE.model_copy(update={"flops_per_s": 1e11})
    # 1 s per step + 0.708 s upload: 10 s leave room for floor(9.29) = 9 steps
    assert w.max_local_steps(one_second_steps, 10.0, 1e11, 1_000_000, cap=100) == 9
    assert w.max_local_steps(one_second_steps, 10.0, 1e11, 1_000_000, cap=3) == 3
    # Exactly on the deadline counts: 4 steps of 1 s with nothing to upload in 4 s.
    assert w.max_local_steps(one_second_steps, 4.0, 1e11, 0, cap=100) == 4
    # The upload alone (0.708 s) misses a 0.5 s deadline.
    assert w.max_local_steps(one_second_steps, 0.5, 1e11, 1_000_000, cap=100) == 0
    # Seeds uploads grow with the number of perturbations: 1e6 bytes per perturbation is 0.708 s each.
    assert w.max_perturbations(one_second_steps, 10.0, 1e11, 0, cap=100, bytes_per_perturbation=1e6) == 5
    assert w.max_perturbations(one_second_steps, 10.0, 0, 0, cap=7) == 7
    with pytest.raises(ValueError, match="deadline_s"):
        w.max_local_steps(one_second_steps, 0.0, 1e11, 0, cap=1)
    with pytest.raises(ValueError, match="cap"):
        w.max_local_steps(one_second_steps, 1.0, 1e11, 0, cap=-1)


@pytest.mark.parametrize("seed", range(5))
def test_budgets_respect_the_deadline_for_random_devices(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for profile in DevicePopulation().draw(40, seed):
        deadline = float(rng.uniform(0.5, 300.0))
        unit_flops = float(rng.uniform(1e9, 5e12))
        upload = float(rng.integers(0, 50_000_000))
        per_unit_bytes = float(rng.integers(0, 100))
        cap = int(rng.integers(0, 500))

        steps = w.max_local_steps(profile, deadline, unit_flops, upload, cap)
        perts = w.max_perturbations(profile, deadline, unit_flops, upload, cap, bytes_per_perturbation=per_unit_bytes)
        for budget, per_unit in ((steps, 0.0), (perts, per_unit_bytes)):
            # Seconds of a round with s units: compute s * unit_flops, then upload upload + s * per_unit bytes.
            totals = [
                w.round_cost(profile, s * unit_flops, upload + s * per_unit).total_s for s in (0, budget, budget + 1)
            ]
            assert 0 <= budget <= cap
            if totals[0] > deadline:
                assert budget == 0
                continue
            assert totals[1] <= deadline
            assert budget == cap or totals[2] > deadline


def test_select_clients_picks_the_cheapest_with_ties_by_id() -> None:
    costs = {4: 1.0, 2: 3.0, 7: 1.0, 0: 2.0, 9: math.inf}
    assert w.select_clients(costs, 3) == [4, 7, 0]
    assert w.select_clients(costs, 5) == [4, 7, 0, 2, 9]
    assert w.select_clients(costs, 0) == []
    with pytest.raises(ValueError, match="cannot select 6 clients out of 5"):
        w.select_clients(costs, 6)
    with pytest.raises(ValueError, match="NaN"):
        w.select_clients({0: math.nan}, 1)


def test_select_clients_exploration_is_seeded() -> None:
    costs = {c: float(c) for c in range(20)}
    picked = w.select_clients(costs, 4, 3, explore=0.5)
    assert picked[:2] == [0, 1] and len(set(picked)) == 4
    assert all(c >= 2 for c in picked[2:])
    assert w.select_clients(costs, 4, 3, explore=0.5) == picked
    assert w.select_clients(costs, 4, np.random.Generator(np.random.PCG64(3)), explore=0.5) == picked
    assert any(w.select_clients(costs, 4, seed, explore=0.5) != picked for seed in range(4, 10))
    with pytest.raises(ValueError, match="rng_or_seed"):
        w.select_clients(costs, 4, explore=0.5)


def test_draw_is_deterministic_within_ranges_and_prefix_stable() -> None:
    population = DevicePopulation()
    profiles = population.draw(50, seed=1)
    assert population.draw(50, seed=1) == profiles
    assert population.draw(50, seed=2) != profiles
    assert population.draw(10, seed=1) == profiles[:10]
    for p in profiles:
        assert population.bandwidth_hz_min <= p.bandwidth_hz <= population.bandwidth_hz_max
        assert population.tx_power_w_min <= p.tx_power_w <= population.tx_power_w_max
        assert population.path_loss_db_min <= p.path_loss_db <= population.path_loss_db_max
        assert population.flops_per_s_min <= p.flops_per_s <= population.flops_per_s_max
        assert population.joules_per_flop_min <= p.joules_per_flop <= population.joules_per_flop_max
        assert p.fading >= population.fading_floor
        assert p.noise_psd_dbm_hz == -174.0
    # Rayleigh: |h|^2 ~ Exp(1), so the mean over many devices is near 1.
    fades = [p.fading for p in population.draw(4000, seed=5)]
    assert np.mean(fades) == pytest.approx(1.0, abs=0.06)


def test_heterogeneity_zero_gives_identical_hardware() -> None:
    population = DevicePopulation(heterogeneity=0.0, fading="none")
    profiles = population.draw(5, seed=0)
    assert all(p == profiles[0] for p in profiles)
    assert profiles[0].bandwidth_hz == pytest.approx(1.25e6)
    # Log-uniform speed shrinks to the geometric centre: sqrt(5e10 * 1e12) = 2.236e11 FLOP/s.
    assert profiles[0].flops_per_s == pytest.approx(math.sqrt(5e10 * 1e12))
    assert profiles[0].fading == 1.0
    half = DevicePopulation(heterogeneity=0.5)
    for p in half.draw(50, seed=0):
        assert 107.5 <= p.path_loss_db <= 122.5


def test_refade_changes_only_the_fading_and_is_seeded() -> None:
    population = DevicePopulation()
    profile = population.draw(1, seed=0)[0]
    faded = population.refade(profile, seed=0, client_id=0, round_index=3)
    assert faded.model_copy(update={"fading": profile.fading}) == profile
    assert population.refade(profile, seed=0, client_id=0, round_index=3) == faded
    assert population.refade(profile, seed=0, client_id=0, round_index=4).fading != faded.fading


def test_devices_spec_profiles() -> None:
    spec = DevicesSpec()
    assert spec.profiles_for(4, seed=9) == DevicePopulation().draw(4, seed=9)
    explicit = DevicesSpec.model_validate({"profiles": [{"bandwidth_hz": 2e6}, {"tx_power_w": 0.1}]})
    assert explicit.profiles_for(2, seed=0)[0].bandwidth_hz == 2e6
    with pytest.raises(ValueError, match="lists 2 profiles but the job has 3 clients"):
        explicit.profiles_for(3, seed=0)


def test_profile_and_population_validation() -> None:
    with pytest.raises(ValidationError):
        DeviceProfile(bandwidth_hz=0)
    with pytest.raises(ValidationError):
        DeviceProfile(fading=-1.0)
    with pytest.raises(ValidationError):
        DeviceProfile(flops_per_s=math.inf)
    with pytest.raises(ValidationError):
        DeviceProfile.model_validate({"bandwidth": 1e6})
    with pytest.raises(ValidationError, match="path_loss_db_min"):
        DevicePopulation(path_loss_db_min=130, path_loss_db_max=100)
    with pytest.raises(ValidationError):
        DevicePopulation(heterogeneity=1.5)
    with pytest.raises(ValidationError):
        REFERENCE.tx_power_w = 1.0  # type: ignore[misc]
