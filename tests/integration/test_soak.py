"""The soak at CI size: 200 simulated clients x 3 rounds through the real services, RabbitMQ and Redis.

`bench/soak.py` at 1,000 clients x 20 rounds is the full run; this is the same code, smaller. Every
update is merged exactly once (counted by the round records and the aggregator's counters, and
checked against the mean of the seeded deltas), and the aggregator's memory does not grow with the
clients it merges: holding every decoded update would take 200 x 302 KB = 59 MB.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import run_soak

pytestmark = pytest.mark.integration

CLIENTS, ROUNDS = 200, 3


def test_every_update_is_merged_exactly_once_and_aggregator_memory_stays_flat(tmp_path: Path) -> None:
    result = run_soak(CLIENTS, ROUNDS, workers=2, log_dir=tmp_path, timeout_s=600, round_deadline_s=240)

    assert result["expected_updates"] == CLIENTS * ROUNDS
    assert result["merged_updates"] == CLIENTS * ROUNDS
    assert result["aggregator_outcomes"] == {"merged": CLIENTS * ROUNDS, "duplicate": 0, "late": 0, "invalid": 0}
    assert result["worker_tasks"]["done"] == CLIENTS * ROUNDS
    assert result["worker_tasks"]["duplicate"] == result["worker_tasks"]["failed"] == 0
    for round_ in result["per_round"]:
        assert round_["updates"] == round_["num_clients"] == CLIENTS
        # One update lost or counted twice moves the mean by about one_update_shift (~3e-5 here);
        # float32 rounding of the committed state is ~1e-8.
        assert round_["mean_error"] < round_["one_update_shift"] / 100

    held_mb = result["all_updates_held_mb"]
    assert held_mb > 55
    rises = [r["rss_peak_mb"] - r["rss_start_mb"] for r in result["per_round"]]
    # Merging streams: a round's rise is the commit's (state, evaluation, archive: ~20 MB at 50 or 1,000
    # clients), where holding the round's updates would add 59 MB to it.
    assert max(rises) < held_mb * 3 / 4, rises
    peaks = [r["rss_peak_mb"] for r in result["per_round"]]
    assert max(peaks[1:]) - peaks[0] < 16, peaks  # and nothing accumulates from round to round
