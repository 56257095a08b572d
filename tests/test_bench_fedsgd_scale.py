"""bench/fedsgd_scale.py as the README runs it (`--rounds 30 --batches 25 --timeout 1500 --name
fedsgd-scale-30`, and `--rounds 4 --batches 1,25`; one run with both sets of options), on the tiny
model (`--set`) at a few clients and two rounds: FwdLLM's FedSGD job on a fresh cluster of the real
services over RabbitMQ and Redis per `--batches` value, every client's update merged every round, the
per-round figures summarized (rounds per minute, overhead, accuracy in [0, 1]), the batched and
unbatched runs committing the same state, and the report and plot under `--out` (never into
bench/results), the summary as the last line.

The README runs it under `flock /tmp/pwff-bench.lock env PWFF_TORCH_THREADS=1`: the lock only queues
benchmarks (a test must not wait on one), and the harness sets PWFF_TORCH_THREADS=1 itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPO, run_bench_script

pytestmark = pytest.mark.integration

CLIENTS, ROUNDS = 10, 2
SMALL = ["--clients", str(CLIENTS), "--eval", "16", "--set", "model=tiny-bert"]


def committed(name: str) -> dict[str, tuple[int, int] | None]:
    """bench/results/NAME.json and .png as they are (None where absent): a run under `--out` leaves them alone."""
    files = [REPO / "bench" / "results" / f"{name}.{ext}" for ext in ("json", "png")]
    return {f.name: (f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for f in files}


def fedsgd_scale(tmp_path: Path, name: str, *args: str) -> dict[str, Any]:
    """`bench/fedsgd_scale.py ARGS --out TMP/out` at CLIENTS clients of the tiny model: its report."""
    out, before = tmp_path / "out", committed(name)
    lines = run_bench_script("fedsgd_scale.py", [*args, "--out", str(out), *SMALL], tmp_path / "cache")
    assert committed(name) == before
    assert {p.name for p in out.iterdir()} == {f"{name}.json", f"{name}.png"}
    assert (out / f"{name}.png").stat().st_size > 10_000
    report: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    assert report["summary"] == json.loads(lines[-1])
    return report


def check_run(report: dict[str, Any], clients_per_task: int) -> None:
    """One `--batches` value's run: its summary row, spec and per-round figures."""
    row = report["summary"][f"k{clients_per_task}"]
    assert row["rounds_per_min"] > 0 and row["steady_rounds_per_min"] > 0
    assert row["steady_workers_compute_s"] > 0 and row["steady_overhead_ms_per_client"] > 0
    assert len(row["accuracy"]) == ROUNDS + 1  # the untrained model, then every round
    assert all(0.0 <= accuracy <= 1.0 for accuracy in row["accuracy"])
    spec = report["specs"][f"k{clients_per_task}"]
    assert (spec["model"], spec["mode"], spec["fwd"]["regime"]) == ("tiny-bert", "fwd", "fedsgd")
    assert (spec["clients_per_task"], spec["num_clients"], spec["clients_per_round"]) == (
        clients_per_task,
        CLIENTS,
        CLIENTS,
    )
    run = next(r for r in report["results"]["runs"] if r["clients_per_task"] == clients_per_task)
    # Every client trains and is merged in every round, one perturbation each; then the job is cancelled.
    assert run["tasks_done"] == CLIENTS * ROUNDS
    assert [(r["round"], r["updates"], r["perturbations"]) for r in run["per_round"]] == [
        (round_, CLIENTS, CLIENTS) for round_ in range(1, ROUNDS + 1)
    ]
    for figures in run["per_round"]:
        assert figures["wall_s"] > 0 and figures["workers_compute_s"] > 0
        assert figures["overhead_s"] == pytest.approx(figures["wall_s"] - figures["workers_compute_s"])


def test_batched_and_unbatched_runs_commit_the_same_state(tmp_path: Path) -> None:
    # Both README commands in one run (each costs ~45 s of cluster start): `--batches 1,25`, and the
    # 30-round one's `--timeout` and `--name`.
    name = "fedsgd-scale-30"
    report = fedsgd_scale(
        tmp_path, name, *("--rounds", str(ROUNDS), "--batches", "1,25", "--timeout", "1500", "--name", name)
    )
    assert set(report["summary"]) == {"clients", "rounds", "workers", "same_state", "k1", "k25"}
    assert report["summary"]["same_state"] is True
    check_run(report, 1)
    check_run(report, 25)
    # Same clients, same seeds, same state: the same accuracy after every round.
    assert report["summary"]["k1"]["accuracy"] == report["summary"]["k25"]["accuracy"]
