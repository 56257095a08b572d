"""bench/convergence.py as the README runs it (`--job quickstart`, and the default BBC job), on the tiny
model for one round per variant: both sides run embedded from the example files, the report and plot
land under `--out`, a second `--only` run merges into the report, and the summary is the last line."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import run_bench_script

TINY = ["model=tiny-bert", "local_steps=2", "eval_max_examples=32"]


def convergence(out: Path, cache: Path, *args: str) -> dict[str, dict[str, object]]:
    overrides = [part for item in TINY for part in ("--set", item)]
    lines = run_bench_script("convergence.py", [*args, "--out", str(out), *overrides], cache)
    summary: dict[str, dict[str, object]] = json.loads(lines[-1])
    return summary


def test_quickstart_job_side_by_side_then_merged(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = convergence(
        tmp_path,
        cache,
        *("--job", "quickstart", "--name", "quick", "--only", "fwd-local-pool,backprop"),
        *("--rounds", "1", "--backprop-rounds", "1", "--set", "fwd.seed_pool=50"),
        *("--set", "fwd.perturbations_per_local_step=50", "--set", "fwd.max_perturbations_per_local_step=50"),
    )
    assert set(first) == {"fwd-local-pool", "backprop"}
    for row in first.values():
        assert 0.0 <= float(row["final_accuracy"]) <= float(row["best_accuracy"]) <= 1.0  # type: ignore[arg-type]
    # The pool upload is one float16 per pool seed (plus framing); backprop's is a whole LoRA + head delta.
    assert float(first["fwd-local-pool"]["bytes_up_per_client_round"]) < 50 * 2 + 200  # type: ignore[arg-type]
    assert float(first["backprop"]["bytes_up_per_client_round"]) > 1000  # type: ignore[arg-type]
    report = json.loads((tmp_path / "quick.json").read_text())
    # The forward job is fwd-quickstart.yaml's, the reference quickstart.yaml's, both on the overrides.
    assert report["specs"]["fwd-local-pool"]["mode"] == "fwd"
    assert report["specs"]["fwd-local-pool"]["fwd"]["regime"] == "local"
    assert report["specs"]["backprop"]["mode"] == "backprop"
    assert {spec["model"] for spec in report["specs"].values()} == {"tiny-bert"}
    assert (tmp_path / "quick.png").stat().st_size > 10_000

    # A later --only run adds its variant and keeps the earlier ones.
    merged = convergence(
        tmp_path,
        cache,
        *("--job", "quickstart", "--name", "quick", "--only", "fwd-local-seeds", "--rounds", "1"),
    )
    assert set(merged) == {"fwd-local-pool", "backprop", "fwd-local-seeds"}
    assert merged["backprop"] == first["backprop"]


def test_default_job_is_fwd_bbc(tmp_path: Path) -> None:
    summary = convergence(tmp_path, tmp_path / "cache", "--only", "fwd,backprop", "--rounds", "1")
    assert set(summary) == {"fwd", "backprop"}
    report = json.loads((tmp_path / "convergence.json").read_text())
    assert report["specs"]["fwd"]["fwd"]["regime"] == "fedsgd"
    assert (tmp_path / "convergence.png").stat().st_size > 10_000


def test_smollm2_job_reports_perplexity(tmp_path: Path) -> None:
    """`--job smollm2` (the README's causal-LM run) on the tiny causal model: the forward local regime and
    backprop side by side, each with its held-out perplexity per round, plotted instead of accuracy."""
    lines = run_bench_script(
        "convergence.py",
        [
            *("--job", "smollm2", "--name", "lm", "--out", str(tmp_path)),
            *("--set", "model=tiny-llama", "--set", "rounds=1", "--set", "local_steps=2"),
            *("--set", "eval_max_examples=16", "--set", "max_length=32"),
        ],
        tmp_path / "cache",
    )
    summary = json.loads(lines[-1])
    assert set(summary) == {"fwd-local-seeds", "backprop"}
    for row in summary.values():
        assert 1.0 < row["best_perplexity"] <= row["initial_perplexity"]
        assert row["best_perplexity"] <= row["final_perplexity"]
    report = json.loads((tmp_path / "lm.json").read_text())
    fwd = report["specs"]["fwd-local-seeds"]
    assert (fwd["mode"], fwd["dataset"], fwd["fwd"]["regime"], fwd["fwd"]["upload"]) == (
        "fwd",
        "jane-austen",
        "local",
        "seeds",
    )
    assert report["specs"]["backprop"]["mode"] == "backprop"
    # The per-step trajectory: a few bytes per direction, far below backprop's LoRA delta.
    assert summary["fwd-local-seeds"]["bytes_up_per_client_round"] < 1000
    assert summary["backprop"]["bytes_up_per_client_round"] > 1000
    assert len(report["results"]["backprop"]["perplexity"]) == 2  # round 0 (the base) and round 1
    assert (tmp_path / "lm.png").stat().st_size > 10_000
