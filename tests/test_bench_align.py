"""bench/align.py runs whole on the tiny causal model (one round of pwff and none, the per-estimator
memory children), writing its report and plot under tmp_path and printing the summary line last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_benchmark_runs_on_the_tiny_model(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PWFF_CACHE_DIR": str(tmp_path / "cache"),
        "PWFF_TORCH_THREADS": "1",
        "BENCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    overrides = ["model=tiny-llama", "local_steps=1", "align.eval_prompts=2", "align.max_new_tokens=6"]
    command = [sys.executable, str(REPO / "bench" / "align.py"), "--rounds", "1", "--only", "pwff,none"]
    command += ["--out", str(tmp_path)]
    for override in overrides:
        command += ["--set", override]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
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
