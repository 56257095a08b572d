"""Accuracy against epsilon: the quickstart job under client-level differential privacy (DP-FedAvg).

    .venv/bin/python bench/privacy.py                               # calibrate C, then z = 0.1, 0.3, 0.7, 1.5
    .venv/bin/python bench/privacy.py --noise 0.3 --clip 1.2        # one level, a given clip norm
    .venv/bin/python bench/privacy.py [--out DIR] [--set key=value ...]  # report folder, spec overrides

examples/quickstart.yaml (MiniLM-L6, LoRA r=8 on query/value + head, BBC News, 8 clients, Dirichlet(0.5),
every client every round, 10 local AdamW steps) runs embedded with one worker, cut to `--rounds` rounds
and `--eval` held-out examples so that the whole bench fits in about 20 minutes of a loaded CPU.
DP-FedAvg needs every client to weigh alike (`aggregation.weighting: uniform`); the noise is added by
the aggregator (`privacy.noise: server`). `--set` overrides apply to every job, after the bench's own
settings (the tests run it on `model=tiny-bert` with a few local steps).

1. Calibration (`z = 0`, no clipping: clip_norm 1e6): the non-private baseline with uniform weights; the
   aggregator reports each round's median update norm before clipping (`dp_update_norm_median`). The
   clip norm C is the median of those medians (clipping at the median norm, as Andrew et al. 2021
   adapt it to), unless `--clip` gives one.
2. One job per noise multiplier z with that C: final held-out accuracy, and epsilon at delta = 1e-5
   from dp-accounting's RDP accountant (q = clients_per_round / num_clients = 1: every client takes
   part in every round, so there is no amplification by sampling).

Results are saved after every job to bench/results/privacy.json, or under `--out DIR` (earlier levels in
that folder are kept); the PNG (privacy.png, beside it) shows accuracy against epsilon and accuracy by
round. The last line on stdout is the summary: {"clip_norm", "rounds", "delta", "levels": {z: {"epsilon",
"final_accuracy"}}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reports import add_overrides_option, write_report
from services.embedded import EmbeddedCluster
from shared.settings import Settings
from shared.spec import JobSpec, load_spec_file

RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
DELTA = 1e-5
NO_CLIP = 1e6


def level_spec(noise: float, clip: float, rounds: int, eval_examples: int, extra: list[str] | None = None) -> JobSpec:
    overrides = [
        f"name=bench-privacy-z{noise:g}",
        f"rounds={rounds}",
        f"eval_max_examples={eval_examples}",
        "aggregation.weighting=uniform",
        f"privacy.clip_norm={clip}",
        f"privacy.noise_multiplier={noise}",
        f"privacy.delta={DELTA}",
        *(extra or []),
    ]
    return load_spec_file(str(QUICKSTART), overrides)


def run(spec: JobSpec, cache_dir: Path) -> dict[str, Any]:
    began = time.perf_counter()
    with EmbeddedCluster(cache_dir) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id)
    if job["state"] != "succeeded":
        raise RuntimeError(f"{spec.name} job {job['state']}: {job.get('error')}")
    steps = [m for m in job["metrics"] if m["round"] > 0]
    epsilon = steps[-1]["dp_epsilon"]
    return {
        "final_accuracy": steps[-1]["accuracy"],
        "accuracy_by_round": [m["accuracy"] for m in job["metrics"]],
        "epsilon": epsilon if math.isfinite(epsilon) else None,  # z = 0: no guarantee (JSON has no inf)
        "epsilon_by_round": [m["dp_epsilon"] if math.isfinite(m["dp_epsilon"]) else None for m in steps],
        "noise_std": steps[-1]["dp_noise_std"],
        "update_norm_median": [m["dp_update_norm_median"] for m in steps],
        "update_norm_max": [m["dp_update_norm_max"] for m in steps],
        "clipped_fraction": [m["dp_clipped_fraction"] for m in steps],
        "wall_s": time.perf_counter() - began,
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    levels = results.get("levels", {})
    baseline = results.get("baseline")
    return {
        "clip_norm": results.get("clip_norm"),
        "rounds": results.get("rounds"),
        "delta": DELTA,
        "baseline_accuracy": round(baseline["final_accuracy"], 4) if baseline else None,
        "levels": {
            z: {
                "epsilon": round(level["epsilon"], 2) if level["epsilon"] is not None else None,
                "final_accuracy": round(level["final_accuracy"], 4),
            }
            for z, level in sorted(levels.items(), key=lambda item: float(item[0]))
        },
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(results.get("levels", {}).items(), key=lambda item: float(item[0]))
    baseline = results.get("baseline")
    figure, (tradeoff, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    private = [(z, level) for z, level in levels if level["epsilon"] is not None]
    if private:
        tradeoff.plot(
            [level["epsilon"] for _, level in private], [level["final_accuracy"] for _, level in private], "o-"
        )
        for z, level in private:
            tradeoff.annotate(f"z={z}", (level["epsilon"], level["final_accuracy"]), fontsize=8)
        tradeoff.set_xscale("log")
    if baseline:
        tradeoff.axhline(baseline["final_accuracy"], color="gray", linestyle="--", label="no noise, no clipping")
        tradeoff.legend(fontsize=8)
    tradeoff.set(
        title=f"quickstart, {results.get('rounds')} rounds, C={results.get('clip_norm')}",
        xlabel=f"epsilon at delta={DELTA:g} (log)",
        ylabel="final held-out accuracy",
    )
    runs = ([("no noise", baseline)] if baseline else []) + [(f"z={z}", level) for z, level in levels]
    for label, level in runs:
        accuracy = level["accuracy_by_round"]
        tradeoff_label = f"{label} ({accuracy[-1]:.3f})"
        curves.plot(range(len(accuracy)), accuracy, marker="o", label=tradeoff_label)
    curves.set(title="held-out accuracy by round", xlabel="round", ylabel="accuracy")
    curves.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noise", default="0.1,0.3,0.7,1.5", help="comma-separated noise multipliers z")
    parser.add_argument("--clip", type=float, default=None, help="clip norm C (default: calibrated, or the saved one)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every job")
    parser.add_argument("--eval", type=int, default=200, help="held-out examples evaluated per round")
    parser.add_argument("--stop-at", type=float, default=None, help="Unix time after which no further job starts")
    add_overrides_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default bench/results)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cache_dir = Settings().cache_dir
    path = args.out / "privacy.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results: dict[str, Any] = previous.get("results", {})
    specs: dict[str, Any] = previous.get("specs", {})
    if results.get("rounds") != args.rounds:
        results, specs = {}, {}  # figures of another length do not compare
    results["rounds"] = args.rounds

    def save() -> None:  # after every job: a bench cut short still leaves its figures
        write_report(path, summarize(results), results, specs)
        if results.get("baseline") or results.get("levels"):
            plot(results, args.out / "privacy.png")

    clip = args.clip or results.get("clip_norm")
    if args.stop_at is not None and time.time() > args.stop_at:
        print("nothing run: past --stop-at", flush=True)
    elif clip is None:
        spec = level_spec(0.0, NO_CLIP, args.rounds, args.eval, args.overrides)
        baseline = run(spec, cache_dir)
        clip = float(f"{statistics.median(baseline['update_norm_median']):.2g}")
        results["baseline"] = baseline
        specs["baseline"] = spec.model_dump(mode="json")
        print(f"baseline: accuracy {baseline['final_accuracy']:.4f}, update norms {baseline['update_norm_median']}")
    results["clip_norm"] = clip
    save()
    levels = results.setdefault("levels", {})
    for noise in (float(z) for z in args.noise.split(",")):
        if clip is None or (args.stop_at is not None and time.time() > args.stop_at):
            print(f"z={noise:g} not run: past --stop-at", flush=True)
            continue
        spec = level_spec(noise, clip, args.rounds, args.eval, args.overrides)
        outcome = run(spec, cache_dir)
        levels[f"{noise:g}"] = outcome
        specs[f"z={noise:g}"] = spec.model_dump(mode="json")
        print(
            f"z={noise:g} C={clip}: accuracy {outcome['final_accuracy']:.4f}, epsilon {outcome['epsilon']}, "
            f"clipped {outcome['clipped_fraction']}, {outcome['wall_s']:.0f} s",
            flush=True,
        )
        save()
    print(json.dumps(summarize(results)))


if __name__ == "__main__":
    main()
