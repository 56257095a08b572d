"""bench/align.py runs whole on the tiny causal model (one round of pwff and none, the per-estimator
memory children), writing its report and plot under tmp_path and printing the summary line last."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import run_bench_script


def test_the_benchmark_runs_on_the_tiny_model(tmp_path: Path) -> None:
    overrides = ["model=tiny-llama", "local_steps=1", "align.eval_prompts=2", "align.max_new_tokens=6"]
    args = ["--rounds", "1", "--only", "pwff,none", "--out", str(tmp_path)]
    for override in overrides:
        args += ["--set", override]
    lines = run_bench_script("align.py", args, tmp_path / "cache")
    summary = json.loads(lines[-1])
    assert set(summary) == {"pwff", "none"}
    keys = {"reward_gain", "separation", "personalization_gain", "kl", "kl_target", "peak_rss_mb", "bytes_up_per_round"}
    for name in ("pwff", "none"):
        assert keys <= set(summary[name])
        assert summary[name]["peak_rss_mb"] > 0
        assert summary[name]["bytes_up_per_round"] > 0
    assert summary["none"]["personalization_gain"] == 0.0
    report = json.loads((tmp_path / "align.json").read_text())
    assert report["summary"] == summary
    assert set(report["memory"]) == {"backprop", "fwd"}
    assert (tmp_path / "align.png").stat().st_size > 10_000
