"""bench/robust.py as the README runs it (`--runs kind:strategy,...`), on the tiny model for one round:
the clean reference and the poisoned jobs run embedded, the report lands under `--out`, a NaN upload is
rejected every round, a later run merges into the report, and the summary is the last line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.harness import run_bench_script

TINY = ["--set", "model=tiny-bert", "--set", "local_steps=2", "--rounds", "1", "--eval-examples", "32"]


def robust(out: Path, cache: Path, runs: str) -> dict[str, Any]:
    lines = run_bench_script("robust.py", ["--out", str(out), "--runs", runs, *TINY], cache)
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


def test_poisoned_runs_beside_the_clean_one_then_merged(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = robust(tmp_path, cache, "nan:fedavg,scale:krum")
    assert first["rounds"] == 1
    assert 0.0 <= first["clean"] <= 1.0
    assert set(first["final_accuracy"]) == {"nan", "scale"}
    # 2 of the 8 clients are poisoned: their NaN uploads are rejected, the round commits from the rest.
    assert first["rejected"]["nan"]["fedavg"] == 2
    assert first["best"]["scale"][0] == "krum"
    report = json.loads((tmp_path / "robust.json").read_text())
    assert {spec["model"] for spec in report["specs"].values()} == {"tiny-bert"}
    assert (tmp_path / "robust.png").stat().st_size > 10_000

    merged = robust(tmp_path, cache, "scale:fedavg")
    assert merged["clean"] == first["clean"]  # the clean reference is reused, not run again
    assert set(merged["final_accuracy"]["scale"]) == {"krum", "fedavg"}
    assert set(merged["fedavg_drop"]) == {"nan", "scale"}
