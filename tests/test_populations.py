"""Named device populations: `devices.population.preset` (default, cellular-edge)."""

from __future__ import annotations

import statistics

import pytest

from shared.spec import SpecError, parse_spec
from shared.wireless import POPULATION_PRESETS, DevicePopulation, DevicesSpec, dbm_to_w, uplink_rate_bps


def _median_rate(population: DevicePopulation) -> float:
    return statistics.median(uplink_rate_bps(p.model_copy(update={"fading": 1.0})) for p in population.draw(500, 0))


def test_the_default_preset_is_the_field_defaults() -> None:
    assert DevicePopulation(preset="default") == DevicePopulation()
    assert POPULATION_PRESETS["default"] == {}


def test_cellular_edge_is_the_uplink_bound_edge_of_a_cellular_iot_cell() -> None:
    edge = DevicePopulation(preset="cellular-edge")
    assert (edge.bandwidth_hz_min, edge.bandwidth_hz_max) == (180e3, 1.08e6)  # 1 to 6 LTE resource blocks
    assert edge.tx_power_w_min == pytest.approx(dbm_to_w(14), rel=0.01)  # UE power class 6
    assert edge.tx_power_w_max == pytest.approx(dbm_to_w(23), rel=0.01)  # UE power class 3
    assert (edge.path_loss_db_min, edge.path_loss_db_max, edge.noise_psd_dbm_hz) == (125.0, 145.0, -169.0)
    # Only the uplink differs: the same compute hardware as the default population.
    default = DevicePopulation()
    for name in ("flops_per_s_min", "flops_per_s_max", "joules_per_flop_min", "joules_per_flop_max"):
        assert getattr(edge, name) == getattr(default, name)
    assert [p.flops_per_s for p in edge.draw(20, 3)] == [p.flops_per_s for p in default.draw(20, 3)]
    # Tens of kbit/s to a few Mbit/s: about 25x below the broadband default at the median.
    rates = [uplink_rate_bps(p.model_copy(update={"fading": 1.0})) for p in edge.draw(500, 0)]
    assert 5e3 < min(rates) < 5e4 and 1e6 < max(rates) < 3e6
    assert 20 < _median_rate(default) / _median_rate(edge) < 30


def test_fields_given_explicitly_win_over_the_preset() -> None:
    edge = DevicesSpec.model_validate({"population": {"preset": "cellular-edge", "bandwidth_hz_max": 2e6}})
    assert edge.population.bandwidth_hz_max == 2e6 and edge.population.bandwidth_hz_min == 180e3
    # A spec round trip (the services share specs as JSON) keeps the same population.
    again = DevicesSpec.model_validate_json(edge.model_dump_json())
    assert again == edge and again.profiles_for(8, 1) == edge.profiles_for(8, 1)


def test_a_job_names_its_population_and_an_unknown_one_is_refused() -> None:
    spec = parse_spec({"devices": {"population": {"preset": "cellular-edge"}}})
    assert spec.devices.population.noise_psd_dbm_hz == -169.0
    with pytest.raises(SpecError, match=r"devices\.population\.preset: Input should be 'default' or 'cellular-edge'"):
        parse_spec({"devices": {"population": {"preset": "satellite"}}})
    with pytest.raises(SpecError, match="bandwidth_hz_min"):  # the preset's ranges are ordered like any others
        parse_spec({"devices": {"population": {"preset": "cellular-edge", "bandwidth_hz_min": 1.5e6}}})
