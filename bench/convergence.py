"""Convergence on BBC News: backprop vs FwdLLM with both refinements, and with each one off.

    .venv/bin/python bench/convergence.py [--rounds 30] [--set key=value ...]

Every variant runs embedded from `examples/fwd-bbc.yaml` (MiniLM-L6, 8 clients with Dirichlet
label skew, 4 per round, same seed, so the same clients in every round):

- `backprop`: local AdamW steps (`--backprop-steps` per task) on all trainable tensors (LoRA +
  head), the usual fine-tuning; it is the reference the forward modes try to approach;
- `fwd`: forward gradients with variance control (adaptive) and discriminative sampling;
- `fwd-no-variance-control`: a fixed number of perturbations per step (one wave);
- `fwd-no-discriminative`: random directions instead of the best by |cosine|.

Where the round's client mix does not dominate the step (iid, every client every round):

    .venv/bin/python bench/convergence.py --name convergence-iid --rounds 30 \
        --only fwd,fwd-no-variance-control,fwd-no-discriminative --set partition.kind=iid \
        --set clients_per_round=8 --set fwd.max_perturbations_per_step=2048

The quickstart job (`--job quickstart`): `examples/quickstart.yaml` (backprop, the reference) against
`examples/fwd-quickstart.yaml` (the same model, data, clients, partition and seed, trained with local
zeroth-order steps whose trajectories the aggregator replays: `fwd-local-pool`), and the per-step
trajectory upload (`fwd-local-seeds`: 16 directions per step, ~2 KB per task) with each refinement on
(`-variance-control`: adaptive within each step, up to 64 directions; `-discriminative`: the best 16 of
160 candidates by |cosine| with the previous local step, debiased, on every other step;
`-discriminative-every-step`: the same on every step):

    .venv/bin/python bench/convergence.py --job quickstart --name convergence-quickstart
    .venv/bin/python bench/convergence.py --job quickstart --name convergence-quickstart \
        --only fwd-local-seeds,fwd-local-seeds-variance-control,fwd-local-seeds-discriminative,\
fwd-local-seeds-discriminative-every-step

The same two jobs on another data set (`--set` overrides both sides; `--rounds` the forward one):

    .venv/bin/python bench/convergence.py --job quickstart --name convergence-tweets \
        --only fwd-local-pool,backprop --set dataset=tweets-sentiment

A causal LM (`--job smollm2`): `examples/fwd-smollm2.yaml` (SmolLM2-135M, LoRA on q/v, one Jane Austen
novel per client) in the local regime (`fwd-local-seeds`: 8 central differences per local step over
the LoRA tensors at `local_lr` 0.02, the per-step trajectory uploaded) against backprop (`backprop`: AdamW on the same
LoRA), both scaled to what 2 CPU cores run in about half an hour (64-token windows, 3 clients per
round, 4 local steps); the figure is held-out perplexity:

    .venv/bin/python bench/convergence.py --job smollm2 --name convergence-smollm2

Writes bench/results/convergence.json (or NAME.json; `--out` names another folder) and .png
(accuracy against rounds and against wall time; perplexity for a causal LM) and prints, last, one JSON
line with each variant's final and best accuracy (and perplexity, for a causal LM), its wall time to
0.90 held-out accuracy (null if never) and its mean upload per client and round.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from services.embedded import EmbeddedCluster
from shared.settings import Settings
from shared.spec import JobSpec, apply_overrides, load_spec_file, parse_spec

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.reports import write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def variants(base: JobSpec, backprop_steps: int, backprop_rounds: int | None) -> dict[str, JobSpec]:
    data = base.model_dump(mode="json")
    backprop = {
        **data,
        "mode": "backprop",
        "rounds": backprop_rounds or base.rounds,
        "local_steps": backprop_steps,
        "optimizer": {"name": "adamw", "lr": 0.005},
    }
    return {
        "fwd": parse_spec(data),
        "fwd-no-variance-control": parse_spec(apply_overrides(data, ["fwd.variance_control=fixed"])),
        "fwd-no-discriminative": parse_spec(apply_overrides(data, ["fwd.discriminative=false"])),
        "backprop": parse_spec(backprop),
    }


def quickstart_variants(fwd: JobSpec, backprop: JobSpec, seeds_rounds: int | None = None) -> dict[str, JobSpec]:
    """The quickstart pair, and the per-step trajectory upload with each refinement on (12 rounds
    unless `seeds_rounds`: it needs more rounds than the pool upload)."""
    data = fwd.model_dump(mode="json")
    seeds = apply_overrides(
        data,
        [
            "fwd.upload=seeds",
            "fwd.perturbations_per_local_step=16",
            "fwd.max_perturbations_per_local_step=64",
            f"rounds={seeds_rounds or max(12, fwd.rounds)}",
        ],
    )
    return {
        "fwd-local-pool": fwd,
        "fwd-local-seeds": parse_spec(seeds),
        "fwd-local-seeds-variance-control": parse_spec(apply_overrides(seeds, ["fwd.variance_control=adaptive"])),
        "fwd-local-seeds-discriminative": parse_spec(
            apply_overrides(seeds, ["fwd.discriminative=true", "fwd.discriminative_every=2"])
        ),
        "fwd-local-seeds-discriminative-every-step": parse_spec(
            apply_overrides(seeds, ["fwd.discriminative=true", "fwd.discriminative_every=1"])
        ),
        "backprop": backprop,
    }


# What 2 CPU cores fit: a forward local step on SmolLM2's LoRA costs 2 x 8 inferences of 4 x 64 tokens.
SMOLLM2_SCALE = [
    "rounds=5",
    "clients_per_round=3",
    "local_steps=4",
    "max_length=64",
    "eval_max_examples=48",
]


def smollm2_variants(base: JobSpec, overrides: list[str]) -> dict[str, JobSpec]:
    """fwd-smollm2.yaml in the local regime with the defaults measured best on the quickstart (no
    discriminative sampling, a fixed number of directions), and backprop on the same LoRA; `overrides`
    (`--set`) win over both. `local_lr` 0.02 is the best of 5e-4, 5e-3 and 2e-2 (README)."""
    data = base.model_dump(mode="json")
    fwd = apply_overrides(
        data,
        [
            "fwd.regime=local",
            "fwd.upload=seeds",
            "fwd.estimator=fd",
            "fwd.discriminative=false",
            "fwd.variance_control=fixed",
            "fwd.perturbations_per_local_step=8",
            "fwd.max_perturbations_per_local_step=8",
            "fwd.local_momentum=0.0",
            "fwd.local_lr=0.02",
            *overrides,
        ],
    )
    backprop = apply_overrides(
        {**data, "mode": "backprop", "optimizer": {"name": "adamw", "lr": 0.001}}, list(overrides)
    )
    return {"fwd-local-seeds": parse_spec(fwd), "backprop": parse_spec(backprop)}


def time_to(result: dict[str, Any], target: float) -> float | None:
    return next((t for a, t in zip(result["accuracy"], result["wall_s"], strict=True) if a >= target), None)


def run(spec: JobSpec, cache_dir: Path) -> dict[str, Any]:
    began = time.perf_counter()
    points: list[tuple[int, float, float]] = []
    perplexity: dict[int, float] = {}

    def record(job: dict[str, Any]) -> None:
        for m in job["metrics"]:
            if m["round"] not in {p[0] for p in points}:
                points.append((m["round"], m["accuracy"], time.perf_counter() - began))
            if "perplexity" in m:
                perplexity[m["round"]] = m["perplexity"]

    with EmbeddedCluster(cache_dir) as cluster:
        job = cluster.wait(cluster.scheduler.submit(spec), record)
    record(job)
    if job["state"] != "succeeded":
        raise RuntimeError(f"{spec.name} {job['state']}: {job.get('error')}")
    rounds = job["metrics"]
    causal = {"perplexity": [perplexity.get(p[0], float("nan")) for p in points]} if perplexity else {}
    return {
        **causal,
        "rounds": [p[0] for p in points],
        "accuracy": [p[1] for p in points],
        "wall_s": [p[2] for p in points],
        "final_accuracy": rounds[-1]["accuracy"],
        "best_accuracy": max(m["accuracy"] for m in rounds),
        "perturbations_per_step": [m.get("perturbations") for m in rounds[1:]],
        "bytes_up_per_round": [m["bytes_up"] for m in rounds[1:]],
        "bytes_up_per_client_round": sum(m["bytes_up"] for m in rounds[1:])
        / max(1, sum(m["updates"] for m in rounds[1:])),
        "total_wall_s": time.perf_counter() - began,
    }


def title(specs: dict[str, Any]) -> str:
    """What the runs trained on, from their specs (every variant shares model, data and clients)."""
    spec = parse_spec(next(iter(specs.values())))
    partition = spec.partition.kind + (f" {spec.partition.alpha}" if spec.partition.kind == "dirichlet" else "")
    return f"{spec.dataset}, {spec.model}, {spec.num_clients} clients ({partition})"


def plot(results: dict[str, dict[str, Any]], path: Path, suptitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_round, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    # A causal LM's next-token accuracy barely moves; its perplexity is the figure people read.
    figure_of = "perplexity" if all("perplexity" in r for r in results.values()) else "accuracy"
    for name, result in results.items():
        by_round.plot(result["rounds"], result[figure_of], marker=".", label=name)
        by_time.plot(result["wall_s"], result[figure_of], marker=".", label=name)
    by_round.set(xlabel="round", ylabel=f"held-out {figure_of}", title=f"{figure_of} against rounds")
    by_time.set(xlabel="wall time (s, 2 CPU cores, embedded)", title=f"{figure_of} against wall time")
    for axis in (by_round, by_time):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(suptitle)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save(
    results: dict[str, dict[str, Any]], specs: dict[str, Any], name: str, out: Path = RESULTS
) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for variant, r in results.items():
        reached = time_to(r, 0.90)
        summary[variant] = {
            "final_accuracy": round(r["final_accuracy"], 4),
            "best_accuracy": round(r["best_accuracy"], 4),
            "time_to_090_s": round(reached, 1) if reached is not None else None,
            "bytes_up_per_client_round": round(r.get("bytes_up_per_client_round", 0.0), 1),
        }
        if r.get("perplexity"):
            summary[variant]["initial_perplexity"] = round(r["perplexity"][0], 3)
            summary[variant]["final_perplexity"] = round(r["perplexity"][-1], 3)
            summary[variant]["best_perplexity"] = round(min(r["perplexity"]), 3)
    write_report(out / f"{name}.json", summary, results, specs)
    plot(results, out / f"{name}.png", title(specs))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="override the example's rounds")
    parser.add_argument("--backprop-steps", type=int, default=4, help="local steps per backprop task")
    parser.add_argument(
        "--backprop-rounds", type=int, default=None, help="rounds of the backprop reference (it converges sooner)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="spec override key=value")
    parser.add_argument("--only", default="", help="comma-separated variants to run (merged into an existing report)")
    parser.add_argument("--name", default="convergence", help="report name: bench/results/NAME.json and .png")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default bench/results)")
    parser.add_argument(
        "--job", choices=("fwd-bbc", "quickstart", "smollm2"), default="fwd-bbc", help="which example job"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = list(args.overrides) + ([f"rounds={args.rounds}"] if args.rounds else [])
    if args.job == "quickstart":
        fwd = load_spec_file(str(ROOT / "examples" / "fwd-quickstart.yaml"), overrides)
        # --set applies to both sides (another data set, say); --rounds only to the forward one.
        backprop = load_spec_file(
            str(ROOT / "examples" / "quickstart.yaml"),
            list(args.overrides) + ([f"rounds={args.backprop_rounds}"] if args.backprop_rounds else []),
        )
        chosen = quickstart_variants(fwd, backprop, args.rounds)
    elif args.job == "smollm2":
        base = load_spec_file(str(ROOT / "examples" / "fwd-smollm2.yaml"), SMOLLM2_SCALE + overrides)
        chosen = smollm2_variants(base, overrides)
    else:
        base = load_spec_file(str(ROOT / "examples" / "fwd-bbc.yaml"), overrides)
        chosen = variants(base, args.backprop_steps, args.backprop_rounds)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    cache_dir = Settings().cache_dir
    results: dict[str, dict[str, Any]] = {}
    specs = {name: spec.model_dump(mode="json") for name, spec in chosen.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    earlier = args.out / f"{args.name}.json"
    if args.only and earlier.is_file():
        report = json.loads(earlier.read_text())
        results.update(report["results"])
        specs = {**report["specs"], **specs}
    for name, spec in chosen.items():
        results[name] = run(spec, cache_dir)
        save(results, specs, args.name, args.out)  # a long run keeps what it has if it is stopped
        print(
            f"{name}: final {results[name]['final_accuracy']:.4f}, best {results[name]['best_accuracy']:.4f} "
            f"in {results[name]['total_wall_s']:.0f}s",
            flush=True,
        )
    summary = save(results, specs, args.name, args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
