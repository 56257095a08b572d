"""Mixed clients in one job: all-backprop vs all-forward vs half the devices too small for backprop.

    .venv/bin/python bench/mixed.py [--rounds 8] [--only backprop,fwd,mixed] [--name mixed] [--set key=value ...]

The quickstart job (`examples/quickstart.yaml`: MiniLM-L6 + LoRA on BBC News, 8 clients with
Dirichlet(0.5) label skew, every client every round, 10 local steps, same seed) under `mode: auto`,
with the forward settings of `examples/fwd-quickstart.yaml` (local zeroth-order steps on the head
from a pool of 1,000 seeds, one float16 coefficient per seed uploaded). Only the devices differ:

- `backprop`: every device is large (twice what a backprop step needs): local AdamW steps everywhere;
- `fwd`: every device is small (halfway between what a forward step and a backprop step need):
  nobody can backprop, every client trains with forward gradients;
- `mixed`: clients 0-3 large and clients 4-7 small, in the same rounds: one FedAvg merges the
  backprop deltas and the replayed forward trajectories.

The rule is `shared.modes.auto.backprop_fits`, on the catalog's memory figures (MiniLM-L6 needs
about 831 MB for a backprop step of 16 x 64 tokens and 514 MB for a forward one, so the devices
have 1,662 MB and 672 MB). Each variant runs embedded
in one process, one after the other. Then, per device class, one task (client 0's, round 1) runs
alone in a fresh child process: its whole-process peak RSS is what a worker of that class needs, and
its upload is that class's bytes per client and round.

Writes bench/results/NAME.json and NAME.png (accuracy against rounds and against wall time; peak
memory and upload per device class); the last line on stdout is the summary: for each variant its
final and best accuracy, rounds to 0.90 (null if never), bytes up per client and round, and the
clients that trained each way; plus `peak_rss_mb` and `upload_bytes` per device class.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.children import one_task, run_measured
from bench.reports import write_report
from shared.spec import JobSpec, apply_overrides, load_spec_file, parse_spec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VARIANTS = ("backprop", "fwd", "mixed")
CHILD_MARK = "MIXED-CHILD "


def device_memory(variant: str, model: str, tokens: int, num_clients: int) -> list[float]:
    """Each client's device memory in MB: large fits a backprop step of `tokens` tokens, small only a forward one."""
    from shared.catalog import model_info

    info = model_info(model)
    backprop, forward = info.step_memory_mb(tokens, backprop=True), info.step_memory_mb(tokens, backprop=False)
    large, small = 2 * backprop, (backprop + forward) / 2
    if variant == "backprop":
        return [large] * num_clients
    if variant == "fwd":
        return [small] * num_clients
    return [large if client < num_clients // 2 else small for client in range(num_clients)]


def variant_spec(variant: str, rounds: int, overrides: list[str]) -> JobSpec:
    """The quickstart job under `mode: auto`, the forward settings of fwd-quickstart, this variant's devices."""
    quickstart = load_spec_file(str(ROOT / "examples" / "quickstart.yaml")).model_dump(mode="json")
    forward = load_spec_file(str(ROOT / "examples" / "fwd-quickstart.yaml")).fwd.model_dump(mode="json")
    data = apply_overrides(
        {**quickstart, "name": f"bench-mixed-{variant}", "mode": "auto", "rounds": rounds, "fwd": forward}, overrides
    )
    memory = device_memory(variant, data["model"], data["batch_size"] * data["max_length"], data["num_clients"])
    data["devices"] = {"profiles": [{"memory_mb": mb} for mb in memory]}
    return parse_spec(data)


def kinds(spec: JobSpec) -> dict[str, list[int]]:
    """Which clients train with backprop and which with forward gradients (round 1; memory is per device)."""
    from shared.modes.auto import backprop_fits

    fits = {client: backprop_fits(spec, client, 1) for client in range(spec.num_clients)}
    return {"backprop": [c for c, f in fits.items() if f], "fwd": [c for c, f in fits.items() if not f]}


def run(spec: JobSpec) -> dict[str, Any]:
    """The job embedded (bench/convergence.py's run: accuracy by round and wall time), and who trained how."""
    from bench.convergence import run as run_embedded
    from shared.settings import Settings

    return {**run_embedded(spec, Settings().cache_dir), "clients_by_kind": kinds(spec)}


# -- one task per device class, alone in a fresh process ----------------------------------------------


def measure_class(spec: JobSpec) -> dict[str, Any]:
    """Client 0's task of `spec` in a fresh process: its figures and whole-process peak RSS."""
    figures, peak = run_measured(
        Path(__file__).resolve(), ["--task-child", json.dumps(spec.model_dump(mode="json"))], CHILD_MARK
    )
    return {**figures, "peak_rss_mb": peak}


# -- report -------------------------------------------------------------------------------------------


def rounds_to(result: dict[str, Any], target: float) -> int | None:
    return next((r for r, a in zip(result["rounds"], result["accuracy"], strict=True) if a >= target), None)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in VARIANTS:
        r = results.get("variants", {}).get(name)
        if r is None:
            continue
        summary[name] = {
            "final_accuracy": round(r["final_accuracy"], 4),
            "best_accuracy": round(r["best_accuracy"], 4),
            "rounds_to_090": rounds_to(r, 0.90),
            "bytes_up_per_client_round": round(r["bytes_up_per_client_round"], 1),
            "backprop_clients": r["clients_by_kind"]["backprop"],
            "fwd_clients": r["clients_by_kind"]["fwd"],
        }
    for kind, figures in results.get("device_classes", {}).items():
        summary.setdefault("peak_rss_mb", {})[kind] = round(figures["peak_rss_mb"], 1)
        summary.setdefault("upload_bytes", {})[kind] = figures["upload_bytes"]
    return summary


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_round, by_time, memory) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, r in results.get("variants", {}).items():
        label = f"{name} ({len(r['clients_by_kind']['backprop'])} backprop, {len(r['clients_by_kind']['fwd'])} fwd)"
        by_round.plot(r["rounds"], r["accuracy"], marker=".", label=label)
        by_time.plot(r["wall_s"], r["accuracy"], marker=".", label=label)
    by_round.set(xlabel="round", ylabel="held-out accuracy", title="accuracy against rounds")
    by_time.set(xlabel="wall time (s, 2 CPU cores, embedded)", title="accuracy against wall time")
    for axis in (by_round, by_time):
        axis.axhline(0.90, color="gray", linestyle=":")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    classes = results.get("device_classes", {})
    names = list(classes)
    bars = memory.bar(names, [classes[n]["peak_rss_mb"] for n in names], color=["tab:blue", "tab:orange"][: len(names)])
    for bar, name in zip(bars, names, strict=True):
        memory.annotate(
            f"{classes[name]['peak_rss_mb']:.0f} MB, {classes[name]['upload_bytes'] / 1e3:.1f} kB up",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    memory.set(title="one task alone: worker peak RSS per device class", ylabel="MB")
    figure.suptitle("Mixed clients (mode: auto): quickstart job, MiniLM-L6, BBC News, 8 clients (Dirichlet 0.5)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants (merged into the report)")
    parser.add_argument("--name", default="mixed", help="report name: bench/results/NAME.json and .png")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default bench/results)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="spec override key=value")
    parser.add_argument("--skip-memory", action="store_true", help="do not run the per-class task children")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--only: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    path = args.out / f"{args.name}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results: dict[str, Any] = previous.get("results", {})
    specs: dict[str, Any] = previous.get("specs", {})

    def save() -> None:
        write_report(path, summarize(results), results, specs)
        plot(results, path.with_suffix(".png"))

    if not args.skip_memory:
        classes = results.setdefault("device_classes", {})
        for kind, variant in (("backprop", "backprop"), ("fwd", "fwd")):
            classes[kind] = measure_class(variant_spec(variant, args.rounds, args.overrides))
            print(f"{kind} device: {classes[kind]}", flush=True)
    for name in only:
        spec = variant_spec(name, args.rounds, args.overrides)
        specs[name] = spec.model_dump(mode="json")
        results.setdefault("variants", {})[name] = run(spec)
        save()
        r = results["variants"][name]
        print(f"{name}: final {r['final_accuracy']:.4f}, best {r['best_accuracy']:.4f}, {r['total_wall_s']:.0f} s")
    save()
    print(json.dumps(summarize(results)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--task-child":
        figures = one_task(parse_spec(json.loads(sys.argv[2])), "bench-mixed-memory")
        print(CHILD_MARK + json.dumps(figures))
    else:
        main()
