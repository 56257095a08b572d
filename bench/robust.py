"""Robust aggregation against poisoned clients: final accuracy of each strategy vs the clean FedAvg run.

    .venv/bin/python bench/robust.py [--rounds 3] [--kinds nan,scale,sign_flip,noise]
                                     [--strategies fedavg,clip,median,trimmed_mean,krum] [--set key=value ...]

The quickstart job (examples/quickstart.yaml: MiniLM-L6 + LoRA on BBC News, 8 clients with
Dirichlet(0.5) label skew, every client every round, 10 local AdamW steps) runs embedded, once clean
with FedAvg, then with 20% of the clients poisoned (`simulation.poison`, a test/benchmark simulation:
2 of the 8 clients, drawn from the seed, upload a bad delta every round) for each poison kind and
each strategy:

- kinds: `nan` (every value NaN: the aggregator rejects the upload and the round commits from the
  valid ones), `scale` (the delta x1000), `sign_flip` (minus the delta), `noise` (Gaussian noise
  with 1000x the honest delta's RMS as its standard deviation);
- strategies: `fedavg` (plain weighted mean), `clip` (clip_norm: 3x the clean run's last committed
  update norm, measured here), `median`, `trimmed_mean` (trim 0.25: 2 of 8 per side), `krum`
  (Multi-Krum, f = 2, m = n - f = 6: every delta but the f most outlying is averaged, so with the f
  poisoned ones excluded it is FedAvg of the honest clients; a smaller m averages fewer of them).

Every job shares one embedded cluster (the model loads once) and runs one after the other. Fewer
rounds than the quickstart's 6 and a capped held-out set keep the whole under ~25 minutes on 2 busy
cores; the clean run is the reference at the same rounds.

Writes bench/results/robust.json and robust.png (`--out`: another folder) after every job
(`--kinds`/`--strategies` merge into an existing report); the last line on stdout is the summary:
{"clean": acc, "rounds": R, "final_accuracy": {kind: {strategy: acc}}, "best": {kind: [strategy, points below clean]},
"fedavg_drop": {kind: points}, "rejected": {kind: {strategy: updates}}, "wall_s": s}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reports import write_report
from services.embedded import EmbeddedCluster
from shared.codec import decode_tensors
from shared.robust import l2_norm
from shared.settings import Settings
from shared.spec import JobSpec, load_spec_file
from shared.store import Keys

RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
KINDS = ("nan", "scale", "sign_flip", "noise")
STRATEGIES = ("fedavg", "krum", "trimmed_mean", "median", "clip")
"""Run in this order, each over every kind: a run cut short by --stop-at still shows FedAvg beside a robust one."""
ROBUST = {"trim_fraction": 0.25, "byzantine": 2, "krum_selected": 6}
FRACTION = 0.2
CLIP_FACTOR = 3.0


def job_spec(name: str, args: argparse.Namespace, strategy: str, kind: str | None, clip_norm: float) -> JobSpec:
    overrides = [
        f"name=bench-robust-{name.replace('_', '-')}",
        f"rounds={args.rounds}",
        f"eval_max_examples={args.eval_examples}",
        f"aggregation.strategy={strategy}",
        f"aggregation.robust={json.dumps({**ROBUST, 'clip_norm': clip_norm})}",
        *args.set,
    ]
    if kind is not None:
        overrides.append(f"simulation.poison={json.dumps({'fraction': FRACTION, 'kind': kind, 'scale': 1000.0})}")
    return load_spec_file(str(QUICKSTART), overrides)


def run(cluster: EmbeddedCluster, spec: JobSpec) -> dict[str, Any]:
    return run_batch(cluster, [spec])[0]


def run_batch(cluster: EmbeddedCluster, batch: list[JobSpec]) -> list[dict[str, Any]]:
    """The jobs submitted at once (the cluster's workers share them), each waited for."""
    began = time.perf_counter()
    job_ids = [cluster.scheduler.submit(spec) for spec in batch]
    return [
        outcome(cluster, spec, job_id, cluster.wait(job_id), began) for spec, job_id in zip(batch, job_ids, strict=True)
    ]


def outcome(cluster: EmbeddedCluster, spec: JobSpec, job_id: str, job: dict[str, Any], began: float) -> dict[str, Any]:
    if job["state"] != "succeeded":
        raise RuntimeError(f"{spec.name}: job {job['state']}: {job.get('error')}")
    steps = [m for m in job["metrics"] if m["round"] > 0]
    last, before = (cluster.store.get(Keys().global_state(job_id, r)) for r in (spec.rounds, spec.rounds - 1))
    update_norm = None
    if last is not None and before is not None:
        a, b = decode_tensors(last), decode_tensors(before)
        update_norm = l2_norm({name: a[name] - b[name] for name in a})
    return {
        "final_accuracy": steps[-1]["accuracy"],
        "accuracy_by_round": [m["accuracy"] for m in steps],
        "final_loss": steps[-1]["loss"],
        "rejected": sum(int(m.get("rejected", 0)) for m in steps),
        "updates": sum(int(m["updates"]) for m in steps),
        "last_update_norm": update_norm,
        "wall_s": time.perf_counter() - began,
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    clean = results["clean"]["final_accuracy"]
    runs: dict[str, dict[str, Any]] = results.get("poisoned", {})
    final = {kind: {s: round(r["final_accuracy"], 4) for s, r in by.items()} for kind, by in runs.items()}
    best = {}
    for kind, by in final.items():
        robust = {s: acc for s, acc in by.items() if s != "fedavg"}
        if robust:
            name = max(robust, key=lambda s: robust[s])
            best[kind] = [name, round(100 * (clean - robust[name]), 2)]
    return {
        "clean": round(clean, 4),
        "rounds": results["rounds"],
        "final_accuracy": final,
        "best": best,
        "fedavg_drop": {kind: round(100 * (clean - by["fedavg"]), 2) for kind, by in final.items() if "fedavg" in by},
        "rejected": {kind: {s: r["rejected"] for s, r in by.items()} for kind, by in runs.items()},
        "wall_s": round(sum(r["wall_s"] for by in runs.values() for r in by.values()) + results["clean"]["wall_s"]),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = results["clean"]["final_accuracy"]
    runs: dict[str, dict[str, Any]] = results.get("poisoned", {})
    kinds = [k for k in KINDS if k in runs]
    strategies = [s for s in STRATEGIES if any(s in runs[k] for k in kinds)]
    figure, axis = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / max(1, len(strategies))
    for j, strategy in enumerate(strategies):
        # A combination that did not run gets no bar (not a zero).
        ran = [i for i, k in enumerate(kinds) if strategy in runs[k]]
        xs = [i + (j - (len(strategies) - 1) / 2) * width for i in ran]
        values = [runs[kinds[i]][strategy]["final_accuracy"] for i in ran]
        bars = axis.bar(xs, values, width=width, label=strategy)
        for bar, value in zip(bars, values, strict=True):
            axis.annotate(
                f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=6
            )
    axis.axhline(clean, color="black", linestyle="--", label=f"clean FedAvg ({clean:.3f})")
    axis.axhline(clean - 0.01, color="gray", linestyle=":", label="clean - 1 point")
    axis.set_xticks(range(len(kinds)), [f"{k}" for k in kinds])
    axis.set_ylim(0, 1.05)
    axis.set_ylabel(f"held-out accuracy after {results['rounds']} rounds")
    axis.set_title(f"Quickstart job, {int(FRACTION * 100)}% poisoned clients: final accuracy by poison and strategy")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-examples", type=int, default=256, help="held-out examples evaluated per round")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--set", action="append", default=[], help="spec override key=value (every job)")
    parser.add_argument("--name", default="robust", help="report name: NAME.json and NAME.png under --out")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default bench/results)")
    parser.add_argument(
        "--runs", default=None, help="comma-separated kind:strategy pairs to run instead of kinds x strategies"
    )
    parser.add_argument("--parallel", type=int, default=1, help="jobs submitted at once (one worker each)")
    parser.add_argument(
        "--stop-at", type=float, default=None, help="Unix time: start no job that would end past it (report what ran)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out = args.out / f"{args.name}.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    results: dict[str, Any] = previous.get("results", {})
    specs: dict[str, Any] = previous.get("specs", {})
    if results.get("rounds") != args.rounds or results.get("eval_examples") != args.eval_examples:
        results, specs = {}, {}  # a different job: nothing to merge with
    results.update(rounds=args.rounds, eval_examples=args.eval_examples)

    with EmbeddedCluster(Settings().cache_dir, workers=args.parallel) as cluster:
        if "clean" not in results:
            spec = job_spec("clean", args, "fedavg", None, 1.0)
            results["clean"] = run(cluster, spec)
            specs["clean"] = spec.model_dump(mode="json")
            print(f"clean: {results['clean']['final_accuracy']:.4f} ({results['clean']['wall_s']:.0f} s)", flush=True)
        clip_norm = CLIP_FACTOR * (results["clean"]["last_update_norm"] or 1.0 / CLIP_FACTOR)
        results["clip_norm"] = clip_norm
        poisoned = results.setdefault("poisoned", {})
        last_wall = results["clean"]["wall_s"]
        if args.runs:
            pairs = [tuple(item.split(":", 1)) for item in args.runs.split(",")]
        else:
            pairs = [(kind, strategy) for strategy in args.strategies.split(",") for kind in args.kinds.split(",")]
        for start in range(0, len(pairs), args.parallel):
            batch = pairs[start : start + args.parallel]
            if args.stop_at is not None and time.time() + last_wall > args.stop_at:
                print(f"{batch}: skipped (--stop-at)", flush=True)
                continue
            batch_specs = {f"{k}-{s}": job_spec(f"{k}-{s}", args, s, k, clip_norm) for k, s in batch}
            began = time.perf_counter()
            outcomes = run_batch(cluster, list(batch_specs.values()))
            last_wall = time.perf_counter() - began
            for (kind, strategy), (name, spec), outcome in zip(batch, batch_specs.items(), outcomes, strict=True):
                poisoned.setdefault(kind, {})[strategy] = outcome
                specs[name] = spec.model_dump(mode="json")
                print(
                    f"{name}: {outcome['final_accuracy']:.4f} by round {outcome['accuracy_by_round']}, "
                    f"{outcome['rejected']} rejected ({outcome['wall_s']:.0f} s, {len(batch)} at once)",
                    flush=True,
                )
            write_report(out, summarize(results), results, specs)
            plot(results, out.with_suffix(".png"))
    summary = summarize(results)
    write_report(out, summary, results, specs)
    plot(results, out.with_suffix(".png"))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
