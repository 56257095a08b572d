"""bench/soak.py's command line as the README runs it (`--clients 200 --rounds 3`), at a few clients of the
tiny model (`--set`): the synthetic job on a fresh cluster of the real services over RabbitMQ and Redis,
every update merged exactly once (round records, the aggregator's counters, the committed means against
the seeded deltas), the summary's figures, and the report and plot under `--out` (never into
bench/results), the summary as the last line.

tests/integration/test_soak.py drives `run_soak` itself at 200 clients x 3 rounds of MiniLM-L6's shapes
(and checks the aggregator's memory, which the tiny model's updates are too small to show); this one
pins down the script around it. The README's `flock /tmp/pwff-bench.lock` only queues benchmarks: a test
must not wait on one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPO, run_bench_script

pytestmark = pytest.mark.integration

CLIENTS, ROUNDS, WORKERS = 20, 2, 2  # bench/soak.py's default workers


def committed(name: str) -> dict[str, tuple[int, int] | None]:
    """bench/results/NAME.json and .png as they are (None where absent): a run under `--out` leaves them alone."""
    files = [REPO / "bench" / "results" / f"{name}.{ext}" for ext in ("json", "png")]
    return {f.name: (f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for f in files}


def test_every_update_merged_once_reported_under_out(tmp_path: Path) -> None:
    out, before = tmp_path / "out", committed("soak")
    lines = run_bench_script(
        "soak.py",
        ["--clients", str(CLIENTS), "--rounds", str(ROUNDS), "--out", str(out), "--set", "model=tiny-bert"],
        tmp_path / "cache",
    )
    assert committed("soak") == before
    assert {p.name for p in out.iterdir()} == {"soak.json", "soak.png"}
    assert (out / "soak.png").stat().st_size > 10_000
    report: dict[str, Any] = json.loads((out / "soak.json").read_text())
    summary = json.loads(lines[-1])
    assert report["summary"] == summary

    assert (summary["clients"], summary["rounds"], summary["workers"]) == (CLIENTS, ROUNDS, WORKERS)
    assert summary["expected_updates"] == summary["merged_updates"] == CLIENTS * ROUNDS
    assert summary["exactly_once"] is True
    assert 0 <= summary["max_mean_error"] < 1e-6  # one update lost or counted twice: ~1e-4 here
    assert summary["round_wall_s_median"] > 0 and summary["ms_per_update"] > 0 and summary["job_s"] > 0
    assert set(summary["cpu_ms_per_update"]) == {"scheduler", "aggregator", "workers"}
    assert all(value > 0 for value in summary["cpu_ms_per_update"].values())
    assert all(peak > 0 for peak in summary["aggregator_rss_peak_mb_first_last"])

    result = report["results"]
    assert result["aggregator_outcomes"] == {"merged": CLIENTS * ROUNDS, "duplicate": 0, "late": 0, "invalid": 0}
    assert result["worker_tasks"]["done"] == CLIENTS * ROUNDS
    assert result["worker_tasks"]["duplicate"] == result["worker_tasks"]["failed"] == 0
    assert result["worker_tasks"]["evaluated"] == CLIENTS  # the final evaluation reached every client
    for round_ in result["per_round"]:
        assert round_["updates"] == round_["num_clients"] == CLIENTS
        assert round_["mean_error"] < round_["one_update_shift"] / 100
    assert [r["round"] for r in result["per_round"]] == list(range(1, ROUNDS + 1))
    spec = report["specs"]["soak"]
    assert (spec["model"], spec["mode"], spec["num_clients"], spec["rounds"]) == (
        "tiny-bert",
        "synthetic",
        CLIENTS,
        ROUNDS,
    )
