"""bench/pwff.py end to end on the tiny model: full fine-tuning, FedAvg and pwff (FedSA runs the same
code as pwff with another preset), both device populations, the cold start, and the `--replot`,
`--reprice` and `--cold-start --only` paths, written under `--out` (never into bench/results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.harness import run_bench_script

VARIANTS = ("full", "none", "pwff")
TINY = ["--set", "model=tiny-bert", "--set", "num_clients=4", "--set", "clients_per_round=4", "--set", "local_steps=2"]


def bench(out: Path, cache: Path, *args: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads(run_bench_script("pwff.py", ["--out", str(out), *args], cache)[-1])
    return summary


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    out, cache = tmp_path_factory.mktemp("bench"), tmp_path_factory.mktemp("cache")
    summary = bench(out, cache, "--only", ",".join(VARIANTS), "--rounds", "2", *TINY)
    return out, cache, summary


def test_variants_on_both_populations(report: tuple[Path, Path, dict[str, Any]]) -> None:
    out, _, summary = report
    assert set(summary) == {*VARIANTS, "cellular-edge", "cold_start"}
    for name in VARIANTS:
        row = summary[name]
        for key in ("bytes_up_per_round", "bytes_down_per_round", "delay_s_per_round", "energy_j_per_round"):
            assert row[key] > 0, (name, key)
        assert 0.0 <= row["global_acc"] <= 1.0 and 0.0 <= row["personalized_acc"] <= 1.0
        edge = summary["cellular-edge"][name]
        # Same bytes over a narrower, noisier uplink: never faster than the broadband population.
        assert edge["delay_s_per_round"] > row["delay_s_per_round"]
    # Full fine-tuning uploads every weight; partial aggregation uploads less than FedAvg.
    assert summary["full"]["bytes_up_per_round"] > 10 * summary["none"]["bytes_up_per_round"]
    assert summary["pwff"]["bytes_up_per_round"] < summary["none"]["bytes_up_per_round"]
    assert summary["full"]["flops_per_round"] > summary["none"]["flops_per_round"]
    for name in ("none", "pwff", "pwff/clients-mean", "pwff/clients-basis"):
        assert set(summary["cold_start"][name]) == {"0", "1", "5", "20"}
    assert {p.name for p in out.iterdir()} == {"pwff.json", "pwff.png", "pwff-coldstart.png"}
    assert json.loads((out / "pwff.json").read_text())["summary"] == summary


def test_replot_reprice_and_only_reuse_the_report(report: tuple[Path, Path, dict[str, Any]]) -> None:
    out, cache, summary = report
    assert bench(out, cache, "--replot") == summary
    assert bench(out, cache, "--reprice") == summary  # same presets: the same prices
    before = (out / "pwff-coldstart.png").stat().st_mtime_ns
    redone = bench(out, cache, "--cold-start", "--only", "pwff", "--rounds", "2", *TINY)
    assert redone["cold_start"]["pwff"] == summary["cold_start"]["pwff"]  # seeded: the same newcomers
    assert redone["none"] == summary["none"]
    assert (out / "pwff-coldstart.png").stat().st_mtime_ns > before
