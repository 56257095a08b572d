"""The example specs the README shows: every one parses, and the forward-gradient quickstart learns as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.spec import load_spec_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_a_valid_spec(path: Path) -> None:
    spec = load_spec_file(str(path))
    assert spec.name == path.stem


@pytest.mark.slow
def test_fwd_quickstart_learns_in_three_rounds_with_two_kilobyte_uploads(tmp_path: Path) -> None:
    """`pwff run examples/fwd-quickstart.yaml` (3 of its 20 rounds): real MiniLM-L6 on BBC News.

    Its cosine schedule would spread the decay over the 3 rounds and leave the last with no step: at
    the example's round-1 rate throughout, 3 rounds show what its first rounds do."""
    out = tmp_path / "run"
    env = {**os.environ, "PWFF_TORCH_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "services.cli", "run", "examples/fwd-quickstart.yaml", "--set", "rounds=3"]
    command += ["--set", "fwd.lr_schedule=constant"]
    result = subprocess.run(
        [*command, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = json.loads((out / "metrics.json").read_text())["metrics"]
    assert rounds[-1]["accuracy"] > 0.8, [m["accuracy"] for m in rounds]
    assert all(m["bytes_up"] / m["updates"] <= 2048 for m in rounds[1:])
    assert (out / "global" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_secagg_example_runs_as_the_readme_shows(tmp_path: Path) -> None:
    """`pwff run examples/secagg.yaml` (one of its rounds): real MiniLM-L6, every upload masked, and the round
    commits from the masked sum."""
    out = tmp_path / "run"
    env = {**os.environ, "PWFF_TORCH_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "services.cli", "run", "examples/secagg.yaml", "--set", "rounds=1"]
    result = subprocess.run(
        [*command, "--set", "eval_max_examples=64", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = json.loads((out / "metrics.json").read_text())["metrics"]
    # A secure round is four waves (advertise, share, masked update, unmask), each from all 8 clients.
    assert rounds[-1]["round"] == 1 and rounds[-1]["updates"] == 4 * 8, rounds[-1]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"], [m["accuracy"] for m in rounds]
    assert (out / "global" / "adapter_model.safetensors").is_file()
