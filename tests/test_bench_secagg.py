"""bench/secagg.py as the README runs it (`--rounds 1 --only plain,secagg-32,secagg-62`, and
`--model tiny-bert --name secagg-tiny --rounds 3`), on the tiny model with short local training: every
variant runs embedded from examples/quickstart.yaml (8 clients, all every round), the report and plot
land under `--out`, and the summary is the last line. The secure runs' final adapters match their
unmasked counterparts within the README's figures, and they upload more bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.harness import run_bench_script

# Short local training and evaluation; the quickstart's clients, partition and seed stay.
SMALL = ["local_steps=2", "eval_max_examples=32", "batch_size=4", "max_length=32"]
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def secagg(out: Path, cache: Path, *args: str) -> dict[str, dict[str, float]]:
    overrides = [part for item in SMALL for part in ("--set", item)]
    lines = run_bench_script("secagg.py", [*args, "--out", str(out), *overrides], cache)
    summary: dict[str, dict[str, float]] = json.loads(lines[-1])
    return summary


def snapshot(*stems: str) -> dict[str, int]:
    """The default reports in bench/results (name -> mtime): a run with `--out` must leave them alone."""
    return {p.name: p.stat().st_mtime_ns for stem in stems for p in RESULTS.glob(f"{stem}.*")}


def check_report(out: Path, name: str, variants: set[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    assert set(report["summary"]) == variants
    assert {spec["model"] for spec in report["specs"].values()} == {"tiny-bert"}
    assert {spec["clients_per_round"] for spec in report["specs"].values()} == {8}
    for variant, spec in report["specs"].items():
        assert spec["secure_aggregation"]["enabled"] == variant.startswith("secagg")
        # Secure aggregation's four waves (advertise, share, mask, unmask) each take an upload per client.
        assert report["results"][variant]["updates_per_round"] == 8 * (4 if variant.startswith("secagg") else 1)
    # Masking changes the uploads, not what is learned: every variant ends at the same accuracy.
    assert len({round(r["final_accuracy"], 6) for r in report["results"].values()}) == 1
    assert (out / f"{name}.png").stat().st_size > 10_000
    return report


def test_one_round_plain_and_both_widths(tmp_path: Path) -> None:
    before = snapshot("secagg")
    summary = secagg(
        tmp_path,
        tmp_path / "cache",
        *("--rounds", "1", "--only", "plain,secagg-32,secagg-62"),  # the README's command
        *("--model", "tiny-bert"),
    )
    assert set(summary) == {"plain", "secagg-32", "secagg-62"}
    plain, s32, s62 = summary["plain"], summary["secagg-32"], summary["secagg-62"]
    # README: at 62 bits the final adapter equals the unmasked run's exactly; at 32 bits one round's mean
    # differs by ~1e-9 (7e-9 on MiniLM): float32 rounding, a unit in the last place or so of the adapter's
    # values (1.5e-8 with this short training).
    assert s62["max_abs_diff"] == 0.0
    assert 0.0 <= s32["max_abs_diff"] <= 1e-7
    # The masked vector is 4 or 8 bytes a coordinate, plus keys and shares: more bytes, and more at 62 bits.
    assert plain["bytes_up_per_client_round"] < s32["bytes_up_per_client_round"] < s62["bytes_up_per_client_round"]
    assert 1.5 < s32["bytes_up_ratio"] < s62["bytes_up_ratio"]
    assert s32["bytes_up_ratio"] == round(s32["bytes_up_per_client_round"] / plain["bytes_up_per_client_round"], 3)
    assert "max_abs_diff" not in plain
    report = check_report(tmp_path, "secagg", set(summary))
    assert report["results"]["secagg-32"]["compared_with"] == "plain"
    assert {spec["rounds"] for spec in report["specs"].values()} == {1}
    assert report["specs"]["secagg-62"]["secure_aggregation"]["bits"] == 62
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["secagg.json", "secagg.png"]
    assert snapshot("secagg") == before


def test_tiny_bert_three_rounds_all_variants_named(tmp_path: Path) -> None:
    before = snapshot("secagg", "secagg-tiny")
    summary = secagg(
        tmp_path,
        tmp_path / "cache",
        *("--model", "tiny-bert", "--name", "secagg-tiny", "--rounds", "3"),  # the README's command
    )
    assert set(summary) == {"plain", "secagg-32", "secagg-62", "plain-int8", "secagg-int8-32"}
    # README (tiny-bert, 3 rounds): ~4e-6 at 32 bits once later rounds' AdamW steps carry the first round's
    # fixed-point error, 0 at 62 bits; int8 uploads masked at 32 bits stay close too.
    assert summary["secagg-62"]["max_abs_diff"] == 0.0
    assert 0.0 <= summary["secagg-32"]["max_abs_diff"] <= 1e-5
    assert 0.0 <= summary["secagg-int8-32"]["max_abs_diff"] <= 1e-5
    bytes_up = {name: row["bytes_up_per_client_round"] for name, row in summary.items()}
    assert bytes_up["plain-int8"] < bytes_up["plain"] < bytes_up["secagg-32"] < bytes_up["secagg-62"]
    assert bytes_up["plain-int8"] < bytes_up["secagg-int8-32"]
    report = check_report(tmp_path, "secagg-tiny", set(summary))
    assert report["results"]["secagg-int8-32"]["compared_with"] == "plain-int8"
    assert {spec["rounds"] for spec in report["specs"].values()} == {3}
    assert report["specs"]["secagg-int8-32"]["compression"]["quantize"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["secagg-tiny.json", "secagg-tiny.png"]
    assert snapshot("secagg", "secagg-tiny") == before
