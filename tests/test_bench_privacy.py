"""bench/privacy.py as the README runs it (`bench/privacy.py --rounds 2 --eval 200`, without the `flock`
that only keeps benchmarks from sharing the CPU), on the tiny model with 4 clients and two noise levels:
the calibration run and one job per level run embedded, the report and plot land under `--out`
(bench/results is not touched), a later `--noise` run reuses the calibrated clip norm and merges into the
report, and the summary is the last line. What it pins down: C is calibrated from the baseline's update
norms, epsilon falls as the noise grows and is the README's figure for each z (it depends only on z, the
rounds, q = 1 and delta), accuracies are in [0, 1], and every job ran on the `--set` overrides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.harness import REPO, run_bench_script

TINY = [
    "model=tiny-bert",
    "local_steps=2",
    "num_clients=4",
    "clients_per_round=4",
    "batch_size=4",
    "max_length=32",
]
README_COMMAND = ["--rounds", "2", "--eval", "200"]
# The README's table (MiniLM, 8 clients): the same z, rounds, q and delta give the same epsilon.
README_EPSILON = {"0.1": 210.13, "0.3": 32.35, "0.7": 10.92, "1.5": 4.43}
RESULTS = REPO / "bench" / "results"
WRITTEN = ("privacy.json", "privacy.png")


def results_files() -> dict[str, int | None]:
    """What bench/results holds of this bench's files (mtime in ns, or None when absent)."""
    return {name: (RESULTS / name).stat().st_mtime_ns if (RESULTS / name).exists() else None for name in WRITTEN}


def privacy(out: Path, cache: Path, *args: str) -> tuple[list[str], dict[str, Any]]:
    before = results_files()
    overrides = [part for item in TINY for part in ("--set", item)]
    lines = run_bench_script("privacy.py", [*README_COMMAND, *args, "--out", str(out), *overrides], cache)
    assert results_files() == before, "a run with --out wrote into bench/results"
    summary: dict[str, Any] = json.loads(lines[-1])
    report = json.loads((out / "privacy.json").read_text())
    assert report["summary"] == summary
    for spec in report["specs"].values():
        assert (spec["model"], spec["num_clients"], spec["rounds"], spec["eval_max_examples"]) == (
            "tiny-bert",
            4,
            2,
            200,
        )
        assert spec["aggregation"]["weighting"] == "uniform"
    assert (out / "privacy.png").stat().st_size > 10_000
    return lines, summary


def check_levels(summary: dict[str, Any]) -> None:
    levels = summary["levels"]
    noise = sorted(levels, key=float)
    epsilons = [levels[z]["epsilon"] for z in noise]
    assert epsilons == sorted(epsilons, reverse=True) and len(set(epsilons)) == len(epsilons)
    for z in noise:
        assert levels[z]["epsilon"] == pytest.approx(README_EPSILON[z], abs=0.01)
        assert 0.0 <= levels[z]["final_accuracy"] <= 1.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The README command for two noise levels: the calibration run, then z = 0.1 and z = 1.5."""
    out = tmp_path_factory.mktemp("privacy")
    lines, summary = privacy(out, cache, "--noise", "0.1,1.5")
    assert any(line.startswith("baseline: accuracy") for line in lines)
    return out, summary


def test_calibration_then_one_job_per_noise_level(calibrated: tuple[Path, dict[str, Any]]) -> None:
    out, summary = calibrated
    assert set(summary) == {"clip_norm", "rounds", "delta", "baseline_accuracy", "levels"}
    assert (summary["rounds"], summary["delta"]) == (2, 1e-5)
    assert 0.0 <= summary["baseline_accuracy"] <= 1.0
    assert set(summary["levels"]) == {"0.1", "1.5"}
    check_levels(summary)
    report = json.loads((out / "privacy.json").read_text())
    # C is the median of the baseline's per-round median update norms, to two significant figures.
    norms = sorted(report["results"]["baseline"]["update_norm_median"])
    assert len(norms) == 2
    assert summary["clip_norm"] == float(f"{(norms[0] + norms[1]) / 2:.2g}")
    assert summary["clip_norm"] > 0
    assert report["results"]["baseline"]["epsilon"] is None  # no noise: no guarantee
    for z, level in report["results"]["levels"].items():
        assert level["noise_std"] > 0
        assert report["specs"][f"z={z}"]["privacy"]["clip_norm"] == summary["clip_norm"]
        assert report["specs"][f"z={z}"]["privacy"]["noise_multiplier"] == float(z)
    assert report["specs"]["baseline"]["privacy"]["noise_multiplier"] == 0.0


def test_another_level_reuses_the_clip_norm_and_merges(
    calibrated: tuple[Path, dict[str, Any]], cache: Path, tmp_path: Path
) -> None:
    first_out, first = calibrated
    out = tmp_path / "report"
    shutil.copytree(first_out, out)
    lines, summary = privacy(out, cache, "--noise", "0.7")
    assert not any(line.startswith("baseline:") for line in lines)  # C comes from the saved report
    assert (summary["clip_norm"], summary["baseline_accuracy"]) == (first["clip_norm"], first["baseline_accuracy"])
    assert set(summary["levels"]) == {"0.1", "0.7", "1.5"}
    for z in ("0.1", "1.5"):
        assert summary["levels"][z] == first["levels"][z]
    check_levels(summary)
