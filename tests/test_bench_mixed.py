"""bench/mixed.py: its device classes split the clients as the variants say, for any model, and the
whole benchmark runs on the tiny model (one round per variant, per-class task children), writing its
report and plot under tmp_path and printing its summary last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.mixed import kinds, variant_spec
from tests.harness import run_bench_script


@pytest.mark.parametrize("model", ["minilm-l6", "tiny-bert"])
def test_device_classes_split_the_clients(model: str) -> None:
    everyone, nobody = list(range(8)), list[int]()
    assert kinds(variant_spec("backprop", 2, [f"model={model}"])) == {"backprop": everyone, "fwd": nobody}
    assert kinds(variant_spec("fwd", 2, [f"model={model}"])) == {"backprop": nobody, "fwd": everyone}
    assert kinds(variant_spec("mixed", 2, [f"model={model}"])) == {"backprop": [0, 1, 2, 3], "fwd": [4, 5, 6, 7]}


def test_variants_are_the_quickstart_job_under_auto_with_fwd_quickstarts_forward_settings() -> None:
    mixed = variant_spec("mixed", 3, [])
    assert (mixed.mode, mixed.rounds, mixed.model, mixed.dataset, mixed.num_clients) == (
        "auto",
        3,
        "minilm-l6",
        "bbc-news",
        8,
    )
    assert (mixed.fwd.regime, mixed.fwd.upload, mixed.fwd.perturb) == ("local", "pool", "head")
    assert mixed.optimizer.name == "adamw"


def test_the_benchmark_runs_on_the_tiny_model(tmp_path: Path) -> None:
    overrides = ["model=tiny-bert", "local_steps=2", "eval_max_examples=32", "fwd.seed_pool=50"]
    args = ["--rounds", "1", "--out", str(tmp_path)]
    for override in overrides:
        args += ["--set", override]
    lines = run_bench_script("mixed.py", args, tmp_path / "cache")
    summary = json.loads(lines[-1])
    assert summary["mixed"]["backprop_clients"] == [0, 1, 2, 3]
    assert summary["mixed"]["fwd_clients"] == [4, 5, 6, 7]
    for variant in ("backprop", "fwd", "mixed"):
        assert 0.0 <= summary[variant]["final_accuracy"] <= 1.0
        assert summary[variant]["bytes_up_per_client_round"] > 0
    # The pool upload is one float16 coefficient per seed; a backprop delta of LoRA + head is far larger.
    assert summary["upload_bytes"]["fwd"] < summary["upload_bytes"]["backprop"]
    assert set(summary["peak_rss_mb"]) == {"backprop", "fwd"}
    report = json.loads((tmp_path / "mixed.json").read_text())
    assert report["summary"] == summary
    assert (tmp_path / "mixed.png").stat().st_size > 10_000
