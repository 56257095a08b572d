"""bench/communication.py as the README runs it (both parts by default, `--parts codecs`, `--parts fwd`),
on the tiny model with one round per job, a couple of codecs and 4 clients: every job runs embedded, the
report and plot land under `--out` (bench/results is not touched), a later run of one part merges into the
report and keeps the other's figures, and the summary is the last line. What it pins down: (seed, g,
loss) triples fit in under 1 KB and scale with the perturbations while a dense upload or a backprop delta
is several times larger, int4 with error feedback uploads far less than float32, every job ran on the
`--set` overrides, and the summary is the report's."""

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
    "eval_max_examples=32",
    "num_clients=4",
    "clients_per_round=4",
    "batch_size=4",
    "max_length=32",
]
RESULTS = REPO / "bench" / "results"
WRITTEN = ("communication.json", "communication.png")


def results_files() -> dict[str, int | None]:
    """What bench/results holds of this bench's files (mtime in ns, or None when absent)."""
    return {name: (RESULTS / name).stat().st_mtime_ns if (RESULTS / name).exists() else None for name in WRITTEN}


def communication(out: Path, cache: Path, *args: str) -> dict[str, Any]:
    before = results_files()
    overrides = [part for item in TINY for part in ("--set", item)]
    lines = run_bench_script("communication.py", [*args, "--out", str(out), *overrides], cache)
    assert results_files() == before, "a run with --out wrote into bench/results"
    summary: dict[str, Any] = json.loads(lines[-1])
    report = json.loads((out / "communication.json").read_text())
    assert report["summary"] == summary
    assert {spec["model"] for spec in report["specs"].values()} == {"tiny-bert"}
    assert {spec["num_clients"] for spec in report["specs"].values()} == {4}
    assert (out / "communication.png").stat().st_size > 10_000
    return summary


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def both_parts(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, dict[str, Any]]:
    """`bench/communication.py` (both parts), two codecs for one round."""
    out = tmp_path_factory.mktemp("both")
    return out, communication(out, cache, "--only", "float32,int4+ef", "--codec-rounds", "1")


def test_both_parts_by_default(both_parts: tuple[Path, dict[str, Any]]) -> None:
    out, summary = both_parts
    assert set(summary) == {"fwd_seed_bytes", "fwd_dense_bytes", "backprop_bytes", "codecs", "vs_float32"}
    # 64 perturbations as (seed, g, loss) triples: under 1 KB whatever the model; the dense estimate and
    # the backprop delta are whole float16 LoRA + head tensors (several KB even on the tiny model).
    assert 0 < summary["fwd_seed_bytes"] < 1000
    assert summary["fwd_dense_bytes"] > 4 * summary["fwd_seed_bytes"]
    assert summary["backprop_bytes"] > 4 * summary["fwd_seed_bytes"]
    assert set(summary["codecs"]) == {"float32", "int4+ef"}
    for codec in summary["codecs"].values():
        assert codec["bytes_up_per_client_round"] > 0
        assert codec["bytes_down_per_round"] > 0
        assert 0.0 <= codec["final_accuracy"] <= 1.0
    assert summary["vs_float32"]["float32"]["upload_reduction"] == 1.0
    assert summary["vs_float32"]["int4+ef"]["upload_reduction"] > 3
    # Each round's committed delta is downloaded once, far less than every task fetching the float32 state.
    for codec in summary["vs_float32"].values():
        assert codec["download_reduction_vs_today"] > 1
    report = json.loads((out / "communication.json").read_text())
    assert report["specs"]["fwd_seed"]["fwd"]["upload"] == "seeds"
    assert report["specs"]["fwd_dense"]["fwd"]["upload"] == "dense"
    assert report["specs"]["codec:int4+ef"]["compression"]["quantize"] == "int4"
    assert {spec["rounds"] for spec in report["specs"].values()} == {1}


def test_codecs_part_merges_into_the_report(
    both_parts: tuple[Path, dict[str, Any]], cache: Path, tmp_path: Path
) -> None:
    first_out, first = both_parts
    out = tmp_path / "report"
    shutil.copytree(first_out, out)
    summary = communication(out, cache, "--parts", "codecs", "--only", "int8", "--codec-rounds", "1")
    assert set(summary["codecs"]) == {"float32", "int4+ef", "int8"}
    for name in ("fwd_seed_bytes", "fwd_dense_bytes", "backprop_bytes"):
        assert summary[name] == first[name]  # the fwd part did not run again
    for name in ("float32", "int4+ef"):
        assert summary["codecs"][name] == first["codecs"][name]
    # int8 sits between float32 and int4 (plus error feedback's nothing on the wire).
    up = {name: codec["bytes_up_per_client_round"] for name, codec in summary["codecs"].items()}
    assert up["int4+ef"] < up["int8"] < up["float32"]


def test_fwd_part_merges_into_the_report(both_parts: tuple[Path, dict[str, Any]], cache: Path, tmp_path: Path) -> None:
    first_out, first = both_parts
    out = tmp_path / "report"
    shutil.copytree(first_out, out)
    summary = communication(out, cache, "--parts", "fwd", "--perturbations", "8", "--rounds", "1")
    assert summary["codecs"] == first["codecs"]  # the codec part did not run again
    # Fewer perturbations, fewer triples; the dense estimate is one tensor per trainable tensor either way.
    assert 0 < summary["fwd_seed_bytes"] < first["fwd_seed_bytes"] / 4
    assert summary["fwd_dense_bytes"] == pytest.approx(first["fwd_dense_bytes"], rel=0.1)
    report = json.loads((out / "communication.json").read_text())
    assert report["specs"]["fwd_seed"]["fwd"]["perturbations_per_task"] == 8
