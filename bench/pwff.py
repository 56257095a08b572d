"""PWFF on tweets-sentiment: full LoRA FedAvg vs the `pwff` preset vs `fedsa`, and compute budgets.

    .venv/bin/python bench/pwff.py [--rounds 8] [--budgets] [--deadline 4] [--only NAMES] [--set key=value ...]

Ten clients with Dirichlet(0.1) label skew train MiniLM-L6 embedded, same seed and clients for
every variant. For each: bytes uploaded, simulated wireless delay (the slowest device) and energy
per round, the global model's held-out accuracy, and the mean over clients of each client's own
held-out accuracy (`personalized_acc`; its test examples are drawn like its training data).
`--budgets` adds the `pwff` preset with deadline-aware compute budgets on the same heterogeneous
devices, to show rounds ending sooner at the same accuracy. BBC News, where the global model is
already near its ceiling:

    .venv/bin/python bench/pwff.py --name pwff-bbc --only none,pwff --set dataset=bbc-news
    .venv/bin/python bench/pwff.py --name pwff-bbc --replot          # redraw the PNG from the JSON

Writes bench/results/pwff.json (or NAME.json) and .png; the last line on stdout is the summary:
{"none": {...}, "pwff": {...}, "fedsa": {...}} with bytes_up_per_round, delay_s_per_round,
energy_j_per_round, global_acc and personalized_acc.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from services.embedded import EmbeddedCluster
from shared.settings import Settings
from shared.spec import JobSpec, apply_overrides, parse_spec

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.reports import write_report

RESULTS = Path(__file__).resolve().parent / "results"

BASE: dict[str, Any] = {
    "name": "bench-pwff",
    "model": "minilm-l6",
    "dataset": "tweets-sentiment",
    "partition": {"kind": "dirichlet", "alpha": 0.1},
    "num_clients": 10,
    "clients_per_round": 10,
    "rounds": 8,
    "local_steps": 10,
    "batch_size": 16,
    "max_length": 48,
    "optimizer": {"name": "adamw", "lr": 0.003},
    "eval_max_examples": 512,
    "seed": 0,
    "budget": {"device_deadline_s": 30.0},
}


def variants(rounds: int, overrides: list[str], budgets: bool, deadline_s: float = 4.0) -> dict[str, JobSpec]:
    base = apply_overrides({**BASE, "rounds": rounds}, overrides)
    every_round = {"eval_every": 1, "eval_examples_per_client": 96}
    specs = {
        preset: parse_spec({**base, "personalization": {"preset": preset, **every_round}})
        for preset in ("none", "pwff", "fedsa")
    }
    if budgets:
        specs["pwff+budgets"] = parse_spec(
            {
                **base,
                "personalization": {"preset": "pwff", **every_round},
                # Below the slowest devices' ~9 s for a full task, above the fastest ones' ~1.5 s:
                # stragglers get fewer local steps, everyone else is untouched.
                "budget": {**base["budget"], "kind": "deadline", "device_deadline_s": deadline_s},
            }
        )
    return specs


def run(spec: JobSpec, cache_dir: Path) -> dict[str, Any]:
    began = time.perf_counter()
    with EmbeddedCluster(cache_dir) as cluster:
        job = cluster.wait(cluster.scheduler.submit(spec))
    if job["state"] != "succeeded":
        raise RuntimeError(f"{spec.personalization.preset}: {job['state']} {job.get('error')}")
    steps = [m for m in job["metrics"] if m["round"] > 0]
    last = job["metrics"][-1]
    return {
        "bytes_up_per_round": statistics.mean(m["bytes_up"] for m in steps),
        "delay_s_per_round": statistics.mean(m["delay_s"] for m in steps),
        "energy_j_per_round": statistics.mean(m["energy_j"] for m in steps),
        "global_acc": last["accuracy"],
        "personalized_acc": last["client_mean_personalized_accuracy"],
        "client_mean_global_acc": last["client_mean_global_accuracy"],
        "per_round": [
            {
                k: m.get(k)
                for k in (
                    "round",
                    "accuracy",
                    "client_mean_global_accuracy",
                    "client_mean_personalized_accuracy",
                    "bytes_up",
                    "delay_s",
                    "energy_j",
                )
            }
            for m in job["metrics"]
        ],
        "per_client_last": last.get("per_client"),
        "wall_s": time.perf_counter() - began,
    }


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name, result in results.items():
        rounds = [r["round"] for r in result["per_round"] if r.get("client_mean_personalized_accuracy") is not None]
        personal = [r["client_mean_personalized_accuracy"] for r in result["per_round"] if r["round"] in rounds]
        global_ = [r["client_mean_global_accuracy"] for r in result["per_round"] if r["round"] in rounds]
        (line,) = axes[0].plot(rounds, personal, marker="o", label=f"{name} personalized")
        axes[0].plot(rounds, global_, linestyle="--", color=line.get_color(), label=f"{name} global")
    axes[0].set(title="mean per-client held-out accuracy", xlabel="round")
    axes[0].legend(fontsize=7)
    names = list(results)
    for axis, key, panel_title in (
        (axes[1], "bytes_up_per_round", "bytes up per round"),
        (axes[2], "delay_s_per_round", "simulated delay per round (s)"),
        (axes[3], "energy_j_per_round", "simulated energy per round (J)"),
    ):
        axis.bar(names, [results[n][key] for n in names])
        axis.set_title(panel_title)
        axis.tick_params(axis="x", rotation=20)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save(results: dict[str, dict[str, Any]], specs: dict[str, Any], out: Path) -> dict[str, dict[str, float]]:
    keys = ("bytes_up_per_round", "delay_s_per_round", "energy_j_per_round", "global_acc", "personalized_acc")
    summary = {name: {k: round(float(r[k]), 4) for k in keys} for name, r in results.items()}
    write_report(out, summary, results, specs)
    first = next(iter(specs.values()))
    partition = first["partition"]
    title = f"{first['dataset']}, {first['model']}, {first['num_clients']} clients, {partition['kind']}"
    plot(results, out.with_suffix(".png"), title + (f"({partition['alpha']})" if partition.get("alpha") else ""))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--budgets", action="store_true", help="also run pwff with deadline budgets")
    parser.add_argument("--deadline", type=float, default=4.0, help="device deadline (s) of the budgets variant")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default="pwff", help="report name: bench/results/NAME.json and .png")
    parser.add_argument("--only", default="", help="comma-separated variants to run (merged into an existing report)")
    parser.add_argument("--replot", action="store_true", help="run nothing: redraw NAME.png from NAME.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = RESULTS / f"{args.name}.json"
    if args.replot:
        report = json.loads(out.read_text())
        print(json.dumps(save(report["results"], report["specs"], out)))
        return
    specs = variants(args.rounds, args.overrides, args.budgets or "pwff+budgets" in args.only, args.deadline)
    if args.only:
        specs = {k: v for k, v in specs.items() if k in args.only.split(",")}
    cache_dir = Settings().cache_dir
    results: dict[str, dict[str, Any]] = {}
    spec_dumps = {name: spec.model_dump(mode="json") for name, spec in specs.items()}
    if args.only and out.is_file():
        report = json.loads(out.read_text())
        results.update(report["results"])
        spec_dumps = {**report["specs"], **spec_dumps}
    summary: dict[str, dict[str, float]] = {}
    for name, spec in specs.items():
        results[name] = run(spec, cache_dir)
        summary = save(results, spec_dumps, out)  # a long run keeps what it has if it is stopped
        r = results[name]
        print(
            f"{name}: global {r['global_acc']:.4f}, personalized {r['personalized_acc']:.4f}, "
            f"{r['bytes_up_per_round']:,.0f} B/round, {r['delay_s_per_round']:.2f} s, {r['energy_j_per_round']:.1f} J "
            f"({r['wall_s']:.0f}s)",
            flush=True,
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
