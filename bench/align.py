"""PWFF's alignment stage on SmolLM2-135M-Instruct: two reward models, two preference groups.

    .venv/bin/python bench/align.py [--rounds 3] [--only pwff,none,fwd] [--name align] [--set key=value ...]
    .venv/bin/python bench/align.py --replot        # redraw the PNG from the JSON

Six clients reply to tweets (`tweets-sentiment`, Dirichlet label skew), scored by `relevance`
(MiniLM-L6 cosine of tweet and reply) and `conciseness` (1 up to 6 words, decaying above).
Clients 0, 2, 4 weigh them 0.9/0.1, clients 1, 3, 5 0.1/0.9: an on-topic reply takes words, so
the groups pull apart. (`--set` can swap in `positivity`, pwff's own sentiment classifier, which
pulls against relevance on negative tweets; it needs `pwff train-reward` first and more rounds
than conciseness to show, so the default pair is the one 2 CPU cores can show in minutes.) Variants, same seed and
clients: `pwff` (the shared feed-forward adapter averaged, the attention LoRA personal), `none`
(one global model for everyone), `fwd` (pwff, the surrogate's gradient from forward gradients).
Each variant runs embedded in a child process; then, for the memory figure, one local alignment
task per estimator runs alone in a child process (its peak RSS is a worker's).

Per client, on held-out prompts after the last round: each reward, the weighted reward (its
weights over the raw rewards), KL per token to the reference, response length, for the reference
(the base model), the global and the personalized model, with per-prompt standard errors.

Writes bench/results/NAME.json and NAME.png (after every variant; `--only` merges into an existing
report); the last line on stdout is the summary `{"pwff": {...}, "none": {...}, "fwd": {...}}`,
each with reward_gain, separation, personalization_gain, kl, kl_target, peak_rss_mb,
bytes_up_per_round (see SUMMARY_DOC).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared.spec import JobSpec, apply_overrides, parse_spec  # noqa: E402

RESULTS = REPO / "bench" / "results"
CHILD_MARK = "ALIGN-CHILD "
VARIANTS = ("pwff", "none", "fwd")
REWARDS = ("relevance", "conciseness")
MODELS = ("reference", "global", "personalized")

BASE: dict[str, Any] = {
    "name": "bench-align",
    "model": "smollm2-135m",
    "dataset": "tweets-sentiment",
    "mode": "align",
    "partition": {"kind": "dirichlet", "alpha": 0.5},
    "num_clients": 6,
    "clients_per_round": 6,
    "rounds": 2,
    "local_steps": 2,
    "eval_max_examples": 32,
    "max_length": 64,
    "seed": 0,
    # A forward-gradient task of SmolLM2 takes minutes on 2 loaded cores: no round may fail at the deadline.
    "round_deadline_s": 7200,
    "optimizer": {"name": "adamw", "lr": 0.003},
    "personalization": {"preset": "pwff"},
    "align": {
        "rewards": [
            {"name": "relevance", "kind": "relevance"},
            {"name": "conciseness", "kind": "conciseness", "target_words": 6},
        ],
        "preferences": {"kind": "groups", "groups": [[0.9, 0.1], [0.1, 0.9]]},
        "prompts_per_step": 2,
        "samples_per_prompt": 4,
        "max_new_tokens": 24,
        "max_prompt_tokens": 32,
        "ppo_epochs": 1,
        "eval_prompts": 8,
        "kl_coef": 0.2,
        "kl_target": 0.5,
        "perturbations": 8,
    },
}

SUMMARY_DOC = {
    "reward_gain": "smallest over clients of the personalized model's weighted reward minus the reference model's "
    "(mean over the client's held-out prompts)",
    "separation": "smaller over the two rewards of (the group preferring it: mean of that reward) minus (the other "
    "group's), personalized models",
    "personalization_gain": "mean over clients of own weighted reward, personalized model minus the none variant's "
    "global model (0 for none)",
    "kl": "largest per-client mean KL per token (personalized model vs the reference)",
    "kl_target": "the spec's align.kl_target",
    "peak_rss_mb": "peak RSS of a worker process running one local alignment task with this estimator",
    "bytes_up_per_round": "bytes uploaded per round (all clients)",
}


def variant_spec(name: str, rounds: int, overrides: list[str]) -> JobSpec:
    data = apply_overrides({**BASE, "rounds": rounds}, overrides)
    data["name"] = f"bench-align-{name}"
    if name == "none":
        data["personalization"] = {**data["personalization"], "preset": "none", "eval_every": rounds}
    else:
        data["personalization"] = {**data["personalization"], "eval_every": rounds}
    if name == "fwd":
        data["align"] = {**data["align"], "estimator": "fwd"}
    return parse_spec(data)


# -- children ---------------------------------------------------------------------------------------


def run_variant_child(spec_json: str) -> None:
    """In a child process: the whole job embedded, printed as JSON."""
    import torch

    from services.embedded import EmbeddedCluster
    from shared.settings import Settings, configure_process

    settings = Settings()
    configure_process(settings)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spec = parse_spec(json.loads(spec_json))
    began = time.perf_counter()
    with EmbeddedCluster(settings.cache_dir) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id)
    job["wall_s"] = time.perf_counter() - began
    print(CHILD_MARK + json.dumps(job, default=float))


def run_task_child(spec_json: str) -> None:
    """In a child process: one local alignment task (one step) of client 0 on the initial state, alone."""
    from bench.children import one_task

    figures = one_task(parse_spec(json.loads(spec_json)), "bench-align-memory", local_steps=1)
    print(CHILD_MARK + json.dumps(figures))


def run_child(flag: str, spec: JobSpec) -> tuple[dict[str, Any], float]:
    """(the child's JSON, its whole-process peak RSS in MB)."""
    from bench.children import run_measured

    return run_measured(Path(__file__).resolve(), [flag, json.dumps(spec.model_dump(mode="json"))], CHILD_MARK)


# -- figures --------------------------------------------------------------------------------------


def client_figures(job: dict[str, Any]) -> dict[int, dict[str, Any]]:
    evaluated = [m for m in job["metrics"] if m.get("per_client")]
    if not evaluated:
        raise RuntimeError(f"job {job['id']} reported no client evaluation")
    return {int(c): figures for c, figures in evaluated[-1]["per_client"].items()}


def groups_of(spec: JobSpec) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for client in range(spec.num_clients):
        group = spec.align.group_of(client)
        groups.setdefault(group if group is not None else 0, []).append(client)
    return groups


def group_table(spec: JobSpec, per_client: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per preference group and model: mean of each reward, the weighted reward, KL and length."""
    table: dict[str, Any] = {}
    for group, clients in groups_of(spec).items():
        rows: dict[str, Any] = {"clients": clients, "weights": spec.align.weights_of(clients[0], spec.num_clients, 0)}
        for model in MODELS:
            keys = [f"reward_{r}" for r in REWARDS] + ["weighted_reward", "kl", "length"]
            rows[model] = {k: statistics.fmean(per_client[c][f"{model}_{k}"] for c in clients) for k in keys}
        table[str(group)] = rows
    return table


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    none_clients = report["variants"].get("none", {}).get("per_client")
    for name, result in report["variants"].items():
        spec = parse_spec(result["spec"])
        per_client = {int(c): f for c, f in result["per_client"].items()}
        gains = [f["personalized_weighted_reward"] - f["reference_weighted_reward"] for f in per_client.values()]
        groups = groups_of(spec)
        separations = []
        for index, reward in enumerate(REWARDS):
            # The group whose weights favour this reward, and the other one.
            prefer = [g for g, cs in groups.items() if spec.align.weights_of(cs[0], spec.num_clients, 0)[index] > 0.5]
            other = [g for g in groups if g not in prefer]
            if not prefer or not other:
                continue
            mean_of = [
                statistics.fmean(per_client[c][f"personalized_reward_{reward}"] for c in groups[g])
                for g in (prefer[0], other[0])
            ]
            separations.append(mean_of[0] - mean_of[1])
        if name == "none" or none_clients is None:
            personalization = 0.0
        else:
            personalization = statistics.fmean(
                per_client[c]["personalized_weighted_reward"] - none_clients[str(c)]["global_weighted_reward"]
                for c in per_client
            )
        rounds = [m for m in result["metrics"] if m["round"] > 0]
        summary[name] = {
            "reward_gain": round(min(gains), 4),
            "reward_gain_mean": round(statistics.fmean(gains), 4),
            "separation": round(min(separations), 4) if separations else None,
            "personalization_gain": round(personalization, 4),
            "kl": round(max(f["personalized_kl"] for f in per_client.values()), 4),
            "kl_target": spec.align.kl_target,
            "peak_rss_mb": round(report["memory"].get(spec.align.estimator, {}).get("peak_rss_mb", float("nan")), 1),
            "bytes_up_per_round": round(statistics.fmean(m.get("bytes_up", 0.0) for m in rounds), 1),
            "wall_s": round(result["wall_s"], 1),
        }
    return summary


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in VARIANTS if n in report["variants"]]
    figure, axes = plt.subplots(2, 2, figsize=(14, 10))
    gain_ax, scatter_ax, kl_ax, cost_ax = axes.flat
    width = 0.8 / (len(names) + 1)
    for offset, name in enumerate(["reference", *names]):
        variant = report["variants"][names[0] if name == "reference" else name]
        per_client = {int(c): f for c, f in variant["per_client"].items()}
        clients = sorted(per_client)
        key = "reference_weighted_reward" if name == "reference" else "personalized_weighted_reward"
        values = [per_client[c][key] for c in clients]
        errors = [per_client[c][key.replace("weighted_reward", "weighted_reward_se")] for c in clients]
        xs = [c + offset * width for c in clients]
        gain_ax.bar(xs, values, width, yerr=errors, capsize=2, label=name if name == "reference" else f"{name}")
    gain_ax.set(title="each client's own weighted reward, held-out prompts (± s.e.)", xlabel="client")
    gain_ax.legend(fontsize=8)
    markers = {"pwff": "o", "none": "s", "fwd": "^"}
    colors = {0: "tab:blue", 1: "tab:red"}
    for name in names:
        variant = report["variants"][name]
        spec = parse_spec(variant["spec"])
        for c, f in variant["per_client"].items():
            group = spec.align.group_of(int(c)) or 0
            x0, y0 = f["reference_reward_relevance"], f["reference_reward_conciseness"]
            x1, y1 = f["personalized_reward_relevance"], f["personalized_reward_conciseness"]
            scatter_ax.scatter([x0], [y0], marker=markers[name], facecolors="none", edgecolors=colors[group], s=40)
            scatter_ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": colors[group]})
            scatter_ax.scatter([x1], [y1], marker=markers[name], color=colors[group], s=40)
    for name, marker in markers.items():
        if name in names:
            scatter_ax.scatter([], [], marker=marker, color="k", label=name)
    scatter_ax.scatter([], [], color=colors[0], label="group 0 (0.9 relevance)")
    scatter_ax.scatter([], [], color=colors[1], label="group 1 (0.9 conciseness)")
    scatter_ax.set(
        title="rewards: reference (hollow) -> personalized model, per client",
        xlabel="relevance (mean)",
        ylabel="conciseness (mean)",
    )
    scatter_ax.legend(fontsize=8)
    for offset, name in enumerate(names):
        per_client = {int(c): f for c, f in report["variants"][name]["per_client"].items()}
        clients = sorted(per_client)
        kl_ax.bar(
            [c + offset * 0.25 for c in clients], [per_client[c]["personalized_kl"] for c in clients], 0.25, label=name
        )
    target = report["summary"][names[0]]["kl_target"]
    kl_ax.axhline(target, color="k", linestyle=":", label="kl_target")
    kl_ax.set(title="KL per token to the reference (personalized model)", xlabel="client")
    kl_ax.legend(fontsize=8)
    summary = report["summary"]
    estimators = [e for e in ("backprop", "fwd") if e in report["memory"]]
    cost_ax.bar(estimators, [report["memory"][e]["peak_rss_mb"] for e in estimators], color="tab:purple")
    cost_ax.set(title="peak RSS of a worker process running one local alignment task (MB)")
    for index, estimator in enumerate(estimators):
        users = [n for n in names if parse_spec(report["variants"][n]["spec"]).align.estimator == estimator]
        label = ", ".join(f"{n}: {summary[n]['bytes_up_per_round'] / 1e3:.0f} kB up/round" for n in users)
        cost_ax.annotate(
            label, (index, report["memory"][estimator]["peak_rss_mb"]), ha="center", va="bottom", fontsize=8
        )
    figure.suptitle(report["title"])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--name", default="align")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default bench/results)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--replot", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    if args.replot:
        report = json.loads(json_path.read_text())
        plot(report, png_path)
        print(json.dumps(report["summary"]))
        return
    report = json.loads(json_path.read_text()) if json_path.exists() else {"variants": {}, "memory": {}}
    report["title"] = (
        f"align: smollm2-135m replying to tweets, {BASE['num_clients']} clients in two preference groups, "
        f"{args.rounds} rounds"
    )
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--only: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if not args.skip_memory:
        for estimator in ("backprop", "fwd"):
            spec = variant_spec("fwd" if estimator == "fwd" else "pwff", args.rounds, args.overrides)
            figures, peak = run_child("--task-child", spec)
            report["memory"][estimator] = {**figures, "peak_rss_mb": peak}
            print(f"memory {estimator}: {peak:.0f} MB peak, task {figures['task_s']:.1f} s", file=sys.stderr)
    for name in only:
        spec = variant_spec(name, args.rounds, args.overrides)
        job, peak = run_child("--variant-child", spec)
        if job["state"] != "succeeded":
            raise RuntimeError(f"variant {name}: job {job['state']}: {job.get('error')}")
        report["variants"][name] = {
            "spec": spec.model_dump(mode="json"),
            "metrics": [{k: v for k, v in m.items() if k != "per_client"} for m in job["metrics"]],
            "per_client": {str(c): f for c, f in client_figures(job).items()},
            "groups": group_table(spec, client_figures(job)),
            "wall_s": job["wall_s"],
            "process_peak_rss_mb": peak,
        }
        print(f"variant {name}: {job['wall_s']:.0f} s", file=sys.stderr)
        save(report, json_path, png_path)
    if report["variants"]:
        save(report, json_path, png_path)
    else:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report.get("summary", {})))


def save(report: dict[str, Any], json_path: Path, png_path: Path) -> None:
    """The summary, the JSON and the PNG, as far as the report goes (written after every variant)."""
    report["summary"] = summarize(report)
    report["summary_doc"] = SUMMARY_DOC
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=float))
    plot(report, png_path)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--variant-child":
        run_variant_child(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--task-child":
        run_task_child(sys.argv[2])
    else:
        main()
