"""bench/memory.py: the local-step modes (fd-local, fd-local-pool) measured on the tiny model like the
others, their specs, the summary keys (the FedSGD modes' keys unchanged), and `--from-json` redraws of
reports written before the local modes existed. Everything is written under tmp_path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.memory import ALL_MODES, MODES, spec_fields, step_ratios, summarize
from shared.spec import parse_spec
from tests.harness import run_bench_script

REPO = Path(__file__).resolve().parents[1]


def run_bench(out: Path, cache: Path, *args: str) -> list[str]:
    return run_bench_script("memory.py", ["--out", str(out), *args], cache, timeout_s=600)


def fake_run(peak: float, step_peak: float, resident: float = 900.0) -> dict[str, Any]:
    return {"peak_mb": peak, "step_peak_mb": step_peak, "rss_model_resident_mb": resident}


def test_local_mode_specs_are_valid_local_regime_jobs() -> None:
    seeds = parse_spec(spec_fields("tiny-llama", "fd-local", 2, 32)).fwd
    assert (seeds.regime, seeds.upload, seeds.estimator, seeds.variance_control) == ("local", "seeds", "fd", "fixed")
    assert (seeds.perturbations_per_local_step, seeds.max_perturbations_per_local_step) == (1, 1)
    assert not seeds.discriminative
    pool = parse_spec(spec_fields("tiny-llama", "fd-local-pool", 2, 32, seed_pool=37)).fwd
    assert (pool.regime, pool.upload, pool.seed_pool) == ("local", "pool", 37)
    with pytest.raises(ValueError, match="unknown mode"):
        spec_fields("tiny-llama", "sgd", 2, 32)


def test_summary_keeps_the_fedsgd_keys_and_adds_the_local_modes() -> None:
    old = {"backprop": fake_run(7000, 6900), "fd": fake_run(1000, 1020), "jvp": fake_run(1400, 1250)}
    assert summarize("m", old) == {
        "model": "m",
        "backprop_peak_mb": 7000,
        "fd_peak_mb": 1000,
        "jvp_peak_mb": 1400,
        "fd_ratio": 7.0,
        "jvp_ratio": 5.0,
    }
    new = {**old, "fd-local": fake_run(1400, 1000), "fd-local-pool": fake_run(3500, 2900)}
    summary = summarize("m", new)
    assert {k: summary[k] for k in summarize("m", old)} == summarize("m", old)
    assert (summary["fd_local_peak_mb"], summary["fd_local_ratio"], summary["fd_local_step_ratio"]) == (1400, 5.0, 60.0)
    assert (summary["fd_local_pool_ratio"], summary["fd_local_pool_step_ratio"]) == (2.0, 3.0)
    steps = step_ratios(new)
    assert (steps["fd_step_ratio"], steps["jvp_step_ratio"], steps["fd_local_step_mb"]) == (50.0, 17.1, 100.0)


def test_from_json_redraws_a_report_without_the_local_modes(tmp_path: Path) -> None:
    """The committed batch-8 report predates fd-local: it redraws and prints its own summary."""
    old = REPO / "bench" / "results" / "memory.json"
    assert not set(json.loads(old.read_text())["models"]["smollm2-135m"]["runs"]) - set(MODES)
    lines = run_bench(tmp_path, tmp_path / "cache", "--from-json", str(old), "--name", "redraw")
    assert json.loads(lines[-1]) == json.loads(old.read_text())["models"]["smollm2-135m"]["summary"]
    assert (tmp_path / "redraw.png").stat().st_size > 10_000


def test_local_modes_are_measured_like_the_others_on_the_tiny_model(tmp_path: Path) -> None:
    lines = run_bench(
        tmp_path,
        tmp_path / "cache",
        *("--models", "tiny-llama", "--batch", "2", "--tokens", "32", "--repeat", "1"),
        *("--modes", "fd-local,fd-local-pool", "--seed-pool", "8", "--name", "tiny"),
    )
    summary = json.loads(lines[-1])
    for key in ("backprop_peak_mb", "fd_local_peak_mb", "fd_local_pool_peak_mb", "fd_local_step_ratio"):
        assert summary[key] > 0, key
    assert "fd_peak_mb" not in summary  # only the modes asked for (and backprop) run
    document = json.loads((tmp_path / "tiny.json").read_text())
    assert document["modes"] == ["backprop", "fd-local", "fd-local-pool"] and document["seed_pool"] == 8
    runs = document["models"]["tiny-llama"]["runs"]
    assert set(runs) == {"backprop", "fd-local", "fd-local-pool"} and set(runs) <= set(ALL_MODES)
    for mode in ("fd-local", "fd-local-pool"):
        run = runs[mode]
        assert run["batch_shape"] == [2, 32] and run["perturbed_dim"] > 0
        assert run["rss_model_resident_mb"] < run["step_peak_mb"] <= run["peak_mb"] + 1
    assert len(runs["fd-local"]["g"]) == 1  # one step of one perturbation: one directional derivative
    assert len(runs["fd-local-pool"]["g"]) == 8 and runs["fd-local-pool"]["seed_pool"] == 8  # a coefficient per seed
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
