"""PWFF on tweets-sentiment: full fine-tuning vs LoRA FedAvg vs the `pwff` preset vs `fedsa`, on two
device populations, and cold start for a client that never trained.

    .venv/bin/python bench/pwff.py [--rounds 8] [--only NAMES] [--budgets] [--deadline 4] [--full-lr 5e-5]
                                   [--set key=value ...]

Ten clients with Dirichlet(0.1) label skew train MiniLM-L6 embedded, same seed and clients for
every variant: `full` (every base weight trained and averaged, `lora.full`, with AdamW at its own
full fine-tuning rate `FULL_LR`; the others at 3e-3), `none` (FedAvg of the attention LoRA and the
head), `pwff` (shared feed-forward adapter and head averaged, attention LoRA personal) and `fedsa`
(LoRA A averaged, B personal). For each: bytes up and down, FLOPs and
measured compute per round, the global model's held-out accuracy, and the mean over clients of
each client's own held-out accuracy (`personalized_acc`; its test examples are drawn like its
training data).

Delay and energy are priced on two device populations (`shared.wireless.POPULATION_PRESETS`):
`default` (a share of an LTE/5G broadband carrier) and `cellular-edge` (the uplink-bound edge of a
cellular IoT cell). The population only enters the cost model (budgets are fixed, clients are
sampled at random), so each variant trains once and the bytes and FLOPs every client spent in
every round are priced on both with the aggregator's own `round_profile` and `round_cost`; the
benchmark checks that pricing the job's own population reproduces the aggregator's figures. The
report keeps every client's FLOPs and upload of every round (`device_work`): `--reprice` prices them
again without training. FLOPs are the aggregator's (`shared.wireless.backprop_step_flops`: forward,
activation gradients, and weight gradients of the trainable parameters only).

Cold start: after the `none`, `pwff` and `fedsa` jobs, four newcomers (128 training and 96 test
examples each, label-skewed like the clients, drawn from the held-out test split) start from the
final global state and fine-tune only their personal part (FedAvg: everything, it has no personal
part) for 1, 5 and 20 steps (`shared.coldstart`); for `pwff` and `fedsa` from the initial
personal part (`global`) and from the clients' merged personal parts (`clients-mean`), for `pwff`
also from their merged LoRA A with B zero (`clients-basis`). The final states are kept in the
cache (PWFF_CACHE_DIR/bench-states), so `--cold-start --only pwff` redoes only that part.

`--budgets` adds `pwff` with deadline-aware compute budgets (priced on its own population only:
its budgets were sized for it). BBC News:

    .venv/bin/python bench/pwff.py --name pwff-bbc --only none,pwff --set dataset=bbc-news
    .venv/bin/python bench/pwff.py --replot                       # redraw the PNGs from the JSON
    .venv/bin/python bench/pwff.py --only full --lr-probe 3e-3,1e-4,5e-5   # a centralized learning-rate probe

Writes bench/results/pwff.json (or NAME.json), NAME.png and NAME-coldstart.png after every
variant (`--only` merges into an existing report); the last line on stdout is the summary:
{"none": {...}, "pwff": {...}, "fedsa": {...}, "full": {...}, "cellular-edge": {name: {...}},
"cold_start": {name: {steps: accuracy}}}, with bytes_up_per_round, delay_s_per_round,
energy_j_per_round, global_acc and personalized_acc (default population) per variant.
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

import torch

from services.embedded import EmbeddedCluster
from shared import coldstart
from shared.adapters import build_model
from shared.codec import decode_tensors
from shared.models import load_tokenizer
from shared.settings import Settings
from shared.spec import JobSpec, apply_overrides, parse_spec
from shared.state import Repositories
from shared.store import Keys
from shared.wireless import DevicesSpec, round_cost, round_profile

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
    # 256 held-out examples for the global model and 64 per client every other round (the first
    # report used 512 and 96 every round): a variant then takes ~10 minutes of one core.
    "eval_max_examples": 256,
    "seed": 0,
    "budget": {"device_deadline_s": 30.0},
}
EVALUATION = {"eval_every": 2, "eval_examples_per_client": 64}
# Full fine-tuning's own learning rate: BASE's 3e-3 suits a LoRA and a fresh head, but on every base
# weight it collapses the model to the majority class (the first report: 0.653 per client, flat).
# 5e-5 is BERT's and MiniLM's usual fine-tuning rate; `--full-lr` tries another.
FULL_LR = 5e-5
VARIANTS = ("none", "pwff", "fedsa", "full")
POPULATIONS = ("default", "cellular-edge")
COLD_START = ("none", "pwff", "fedsa")
COLD_STEPS = (0, 1, 5, 20)
NEWCOMERS, NEWCOMER_TRAIN, NEWCOMER_TEST = 4, 128, 96
SUMMARY_KEYS = ("bytes_up_per_round", "delay_s_per_round", "energy_j_per_round", "global_acc", "personalized_acc")
EXTRA_KEYS = ("client_mean_global_acc", "bytes_down_per_round", "flops_per_round", "compute_s_per_round")
POPULATION_KEYS = ("delay_s_per_round", "delay_s_mean_per_round", "energy_j_per_round", "upload_s_max_per_round")


def variants(
    rounds: int, overrides: list[str], budgets: bool, deadline_s: float = 4.0, full_lr: float = FULL_LR
) -> dict[str, JobSpec]:
    base = apply_overrides({**BASE, "rounds": rounds}, overrides)
    specs = {
        preset: parse_spec({**base, "personalization": {"preset": preset, **EVALUATION}})
        for preset in ("none", "pwff", "fedsa")
    }
    specs["full"] = parse_spec(
        {
            **base,
            "lora": {**base.get("lora", {}), "full": True},
            "optimizer": {**base["optimizer"], "lr": full_lr},
            "personalization": {"preset": "none", **EVALUATION},
        }
    )
    if budgets:
        specs["pwff+budgets"] = parse_spec(
            {
                **base,
                "personalization": {"preset": "pwff", **EVALUATION},
                # Below the slowest devices' ~9 s for a full task, above the fastest ones' ~1.5 s:
                # stragglers get fewer local steps, everyone else is untouched.
                "budget": {**base["budget"], "kind": "deadline", "device_deadline_s": deadline_s},
            }
        )
    return specs


# --- the device populations -------------------------------------------------------------------------


def population_devices(spec: JobSpec, population: str) -> DevicesSpec:
    """The spec's devices with another population preset (the spec's own when it already is that one)."""
    if spec.devices.population.preset == population:
        return spec.devices
    return DevicesSpec.model_validate({"population": {"preset": population}})


def device_work(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What every client spent in every round, as the aggregator recorded it: FLOPs and bytes uploaded
    (kept in the report, so `--reprice` can price it again without training)."""
    return [
        {
            "round": m["round"],
            "devices": {
                client: {
                    "flops": figures["flops"],
                    "upload_bytes": round(figures["upload_s"] * figures["rate_bps"] / 8),  # what it uploaded
                }
                for client, figures in m["devices"].items()
            },
        }
        for m in metrics
        if m["round"] > 0
    ]


def price(spec: JobSpec, work: list[dict[str, Any]], devices: DevicesSpec) -> dict[str, Any]:
    """Every client's recorded FLOPs and upload of every round, priced on `devices` as the aggregator does."""
    per_round = []
    for m in work:
        costs = []
        for client, figures in m["devices"].items():
            profile = round_profile(devices, spec.num_clients, spec.seed, int(client), m["round"])
            costs.append(round_cost(profile, figures["flops"], figures["upload_bytes"]))
        per_round.append(
            {
                "round": m["round"],
                "delay_s": max(c.total_s for c in costs),
                "delay_s_mean": statistics.mean(c.total_s for c in costs),
                "energy_j": sum(c.total_j for c in costs),
                "upload_j": sum(c.upload_j for c in costs),
                "upload_s_max": max(c.upload_s for c in costs),
                "compute_s_max": max(c.compute_s for c in costs),
            }
        )
    return {
        "delay_s_per_round": statistics.mean(r["delay_s"] for r in per_round),
        "delay_s_mean_per_round": statistics.mean(r["delay_s_mean"] for r in per_round),
        "energy_j_per_round": statistics.mean(r["energy_j"] for r in per_round),
        "upload_j_per_round": statistics.mean(r["upload_j"] for r in per_round),
        "upload_s_max_per_round": statistics.mean(r["upload_s_max"] for r in per_round),
        "per_round": per_round,
    }


def check_pricing(spec: JobSpec, metrics: list[dict[str, Any]], priced: dict[str, Any]) -> None:
    """Pricing the job's own devices must give back what the aggregator reported."""
    for m, r in zip([m for m in metrics if m["round"] > 0], priced["per_round"], strict=True):
        for key in ("delay_s", "energy_j"):
            if not math.isclose(m[key], r[key], rel_tol=1e-9):
                raise AssertionError(f"round {m['round']}: priced {key} {r[key]} != the aggregator's {m[key]}")


def price_populations(name: str, spec: JobSpec, work: list[dict[str, Any]]) -> dict[str, Any]:
    populations: dict[str, Any] = {}
    for population in POPULATIONS:
        if name == "pwff+budgets" and population != spec.devices.population.preset:
            continue  # its budgets were sized for its own devices
        populations[population] = price(spec, work, population_devices(spec, population))
    return populations


# --- one variant -------------------------------------------------------------------------------------


def run(name: str, spec: JobSpec, cache_dir: Path) -> dict[str, Any]:
    began = time.perf_counter()
    with EmbeddedCluster(cache_dir) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id)
        blob = cluster.store.get(Keys().global_state(job_id, spec.rounds))
        tensors = Repositories(cluster.store, "pwff").tensors
        personal = [tensors.latest_personal(job_id, c, (spec.rounds + 1, 0)) for c in range(spec.num_clients)]
    if job["state"] != "succeeded" or blob is None:
        raise RuntimeError(f"{name}: {job['state']} {job.get('error')}")
    train_s = time.perf_counter() - began
    steps = [m for m in job["metrics"] if m["round"] > 0]
    evaluated = [m for m in job["metrics"] if m.get("per_client")]
    last = job["metrics"][-1]
    work = device_work(job["metrics"])
    populations = price_populations(name, spec, work)
    check_pricing(spec, job["metrics"], populations[spec.devices.population.preset])
    result: dict[str, Any] = {
        "bytes_up_per_round": statistics.mean(m["bytes_up"] for m in steps),
        "bytes_down_per_round": statistics.mean(m["bytes_down"] for m in steps),
        "delay_s_per_round": statistics.mean(m["delay_s"] for m in steps),
        "energy_j_per_round": statistics.mean(m["energy_j"] for m in steps),
        "flops_per_round": statistics.mean(sum(d["flops"] for d in m["devices"].values()) for m in steps),
        "compute_s_per_round": statistics.mean(m["compute_s_sum"] for m in steps),
        "global_acc": last["accuracy"],
        "personalized_acc": last["client_mean_personalized_accuracy"],
        "client_mean_global_acc": last["client_mean_global_accuracy"],
        "populations": populations,
        "device_work": work,
        "per_round": [
            {
                k: m.get(k)
                for k in (
                    "round",
                    "accuracy",
                    "client_mean_global_accuracy",
                    "client_mean_personalized_accuracy",
                    "bytes_up",
                    "bytes_down",
                    "delay_s",
                    "energy_j",
                    "compute_s_sum",
                )
            }
            for m in job["metrics"]
        ],
        "evaluated_rounds": [m["round"] for m in evaluated],
        "per_client_last": last.get("per_client"),
        "train_wall_s": train_s,
    }
    if name in COLD_START:
        clients = [decode_tensors(found[1]) for found in personal if found is not None]
        states = {"global": blob, **{f"client-{c}": found[1] for c, found in enumerate(personal) if found}}
        save_states(cache_dir, spec, name, states)
        result["cold_start"] = cold_start(spec, decode_tensors(blob), clients, cache_dir)
    result["wall_s"] = time.perf_counter() - began
    return result


def states_dir(cache_dir: Path, spec: JobSpec, name: str) -> Path:
    """Where a variant's final global and personal states are kept for `--cold-start` (keyed by its spec)."""
    import hashlib

    digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]
    return cache_dir / "bench-states" / f"{name}-{digest}"


def save_states(cache_dir: Path, spec: JobSpec, name: str, states: dict[str, bytes]) -> None:
    folder = states_dir(cache_dir, spec, name)
    folder.mkdir(parents=True, exist_ok=True)
    for key, blob in states.items():
        (folder / f"{key}.pwt").write_bytes(blob)


def load_states(
    cache_dir: Path, spec: JobSpec, name: str
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    folder = states_dir(cache_dir, spec, name)
    if not (folder / "global.pwt").is_file():
        raise SystemExit(f"{name}: no saved states in {folder}; run the variant first")
    clients = sorted(folder.glob("client-*.pwt"), key=lambda p: int(p.stem.split("-")[1]))
    return decode_tensors((folder / "global.pwt").read_bytes()), [decode_tensors(p.read_bytes()) for p in clients]


def lr_probe(spec: JobSpec, rates: list[float], cache_dir: Path, steps: int = 80) -> dict[str, Any]:
    """Centralized proxy for a variant's learning rate: `steps` AdamW steps on iid training examples,
    accuracy on 256 other training examples (the test split stays out of the choice)."""
    import numpy as np

    from shared import data
    from shared.batches import collate, minibatches
    from shared.evaluation import evaluate
    from shared.models import initial_state, load_trainable_state

    train = data.load(spec.dataset, "train")
    order = np.random.default_rng(0).permutation(len(train))
    pool = [train[i] for i in order[: steps * spec.batch_size]]
    held = [train[i] for i in order[steps * spec.batch_size : steps * spec.batch_size + 256]]
    tokenizer = load_tokenizer(spec.model, cache_dir)
    model = build_model(spec, cache_dir)
    probe: dict[str, Any] = {"steps": steps, "examples": len(pool), "validation": len(held), "accuracy": {}}
    for rate in rates:
        load_trainable_state(model, initial_state(model, 0))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rate)
        batches = minibatches(pool, spec.batch_size, 0)
        torch.manual_seed(0)
        model.train()
        for _ in range(steps):
            loss = model(**collate(tokenizer, next(batches), "classification", spec.max_length)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        figures = evaluate(model, tokenizer, held, "classification", spec.max_length)
        probe["accuracy"][str(rate)] = figures["accuracy"]
        print(f"lr {rate:g}: validation accuracy {figures['accuracy']:.4f}", flush=True)
    return probe


def cold_start(
    spec: JobSpec, global_state: dict[str, torch.Tensor], clients: list[dict[str, torch.Tensor]], cache_dir: Path
) -> dict[str, Any]:
    """Newcomers' accuracy after 0, 1, 5 and 20 local steps from the job's final global state."""
    model = build_model(spec, cache_dir)
    tokenizer = load_tokenizer(spec.model, cache_dir)
    starts = [coldstart.Start.GLOBAL]
    if coldstart.personalizes(spec, global_state):
        starts.append(coldstart.Start.CLIENTS_MEAN)
    if coldstart.personal_lora_pairs(spec, global_state):
        starts.append(coldstart.Start.CLIENTS_BASIS)
    newcomers = [coldstart.newcomer_examples(spec, i, NEWCOMER_TRAIN, NEWCOMER_TEST) for i in range(NEWCOMERS)]
    curves: dict[str, Any] = {}
    for start in starts:
        state = coldstart.start_state(spec, global_state, start, clients)
        runs: list[dict[str, Any]] = []
        for index, (train, test) in enumerate(newcomers):
            adapted = coldstart.adapt(
                model, tokenizer, spec, state, train, max(COLD_STEPS), seed=index, eval_examples=test,
                checkpoints=COLD_STEPS,
            )  # fmt: skip
            runs.append(
                {
                    "accuracy": [float(p.accuracy or 0.0) for p in adapted.curve],
                    "loss": [p.loss for p in adapted.curve],
                    "train_loss": adapted.train_loss,
                }
            )
        curves[start.value] = {
            "steps": list(COLD_STEPS),
            "accuracy": [statistics.mean(r["accuracy"][i] for r in runs) for i in range(len(COLD_STEPS))],
            "per_newcomer": runs,
            "trained": "personal" if coldstart.personalizes(spec, global_state) else "all",
            "trained_params": adapted.trained_params,
        }
    return curves


# --- the report ---------------------------------------------------------------------------------------


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(2, 3, figsize=(18, 9))
    names = list(results)
    x = np.arange(len(names))
    accuracy = axes[0][0]
    for name, result in results.items():
        evaluated = [r for r in result["per_round"] if r.get("client_mean_personalized_accuracy") is not None]
        rounds = [r["round"] for r in evaluated]
        (line,) = accuracy.plot(
            rounds, [r["client_mean_personalized_accuracy"] for r in evaluated], marker="o", label=f"{name} personal"
        )
        accuracy.plot(
            rounds,
            [r["client_mean_global_accuracy"] for r in evaluated],
            linestyle="--",
            color=line.get_color(),
            label=f"{name} global",
        )
    accuracy.set(title="mean per-client held-out accuracy", xlabel="round")
    accuracy.legend(fontsize=7)

    def bars(axis: Any, series: dict[str, list[float]], panel: str, log: bool = False) -> None:
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            axis.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
        axis.set_xticks(x, names, rotation=20)
        axis.set_title(panel)
        if log:
            axis.set_yscale("log")
        if len(series) > 1:
            axis.legend(fontsize=7)

    bars(
        axes[0][1],
        {
            "up": [results[n]["bytes_up_per_round"] / 1e6 for n in names],
            "down": [results[n]["bytes_down_per_round"] / 1e6 for n in names],
        },
        "MB per round (all clients)",
        log=True,
    )
    bars(
        axes[0][2],
        {"simulated TFLOP": [results[n]["flops_per_round"] / 1e12 for n in names]},
        "simulated TFLOP per round (backprop: 6NT full, ~4NT LoRA)",
    )
    for axis, key, panel in (
        (axes[1][0], "delay_s_per_round", "simulated delay per round, slowest device (s)"),
        (axes[1][1], "energy_j_per_round", "simulated energy per round, all devices (J)"),
    ):
        bars(
            axis,
            {
                population: [results[n]["populations"].get(population, {}).get(key, float("nan")) for n in names]
                for population in POPULATIONS
            },
            panel,
            log=True,
        )
    bars(
        axes[1][2],
        {"measured": [results[n]["compute_s_per_round"] for n in names]},
        "measured local training per round, CPU s (1 thread)",
    )
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_cold_start(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    positions = list(range(len(COLD_STEPS)))
    for name, result in results.items():
        for start, curve in result.get("cold_start", {}).items():
            what = "LoRA + head" if curve["trained"] == "all" else "personal part"
            origin = {
                "global": "its initial values",
                "clients-mean": "the clients' merged personal parts",
                "clients-basis": "the clients' merged LoRA A, B zero",
            }[start]
            label = f"{name}: {what} fine-tuned" + ("" if curve["trained"] == "all" else f", from {origin}")
            (line,) = axis.plot(positions, curve["accuracy"], marker="o", label=label)
            for run in curve["per_newcomer"]:
                axis.plot(positions, run["accuracy"], color=line.get_color(), alpha=0.15)
    if "none" in results and "cold_start" in results["none"]:
        axis.axhline(
            results["none"]["cold_start"]["global"]["accuracy"][0],
            color="k",
            linestyle=":",
            label="FedAvg global model",
        )
    axis.set_xticks(positions, [str(s) for s in COLD_STEPS])
    axis.set(
        xlabel="local steps of the newcomer", ylabel="newcomer's held-out accuracy (mean of 4; thin: each)", ylim=(0, 1)
    )
    axis.set_title(f"cold start: {title}", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        name: {k: round(float(r[k]), 4) for k in (*SUMMARY_KEYS, *EXTRA_KEYS)} for name, r in results.items()
    }
    for population in POPULATIONS[1:]:
        summary[population] = {
            name: {k: round(float(r["populations"][population][k]), 4) for k in POPULATION_KEYS}
            for name, r in results.items()
            if population in r["populations"]
        }
    summary["cold_start"] = {
        (name if start == "global" else f"{name}/{start}"): {
            str(s): round(float(a), 4) for s, a in zip(curve["steps"], curve["accuracy"], strict=True)
        }
        for name, r in results.items()
        for start, curve in r.get("cold_start", {}).items()
    }
    return summary


def save(results: dict[str, dict[str, Any]], specs: dict[str, Any], out: Path) -> dict[str, Any]:
    summary = summarize(results)
    write_report(out, summary, results, specs)
    first = next(iter(specs.values()))
    partition = first["partition"]
    title = f"{first['dataset']}, {first['model']}, {first['num_clients']} clients, {partition['kind']}"
    title += f"({partition['alpha']})" if partition.get("alpha") else ""
    plot(results, out.with_suffix(".png"), title)
    plot_cold_start(results, out.with_name(f"{out.stem}-coldstart.png"), title)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--budgets", action="store_true", help="also run pwff with deadline budgets")
    parser.add_argument("--deadline", type=float, default=4.0, help="device deadline (s) of the budgets variant")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--name", default="pwff", help="report name: OUT/NAME.json and .png")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default bench/results)")
    parser.add_argument("--only", default="", help="comma-separated variants to run (merged into an existing report)")
    parser.add_argument("--replot", action="store_true", help="run nothing: redraw the PNGs from NAME.json")
    parser.add_argument(
        "--reprice",
        action="store_true",
        help="run nothing: price the rows' recorded FLOPs and uploads on the populations again (a preset changed)",
    )
    parser.add_argument("--full-lr", type=float, default=FULL_LR, help="AdamW learning rate of the full variant")
    parser.add_argument(
        "--lr-probe",
        default="",
        help="train nothing federated: comma-separated learning rates of a centralized probe of the --only variant",
    )
    parser.add_argument(
        "--cold-start",
        action="store_true",
        help="train nothing: redo the --only variants' cold start from the states their last run saved",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = args.out / f"{args.name}.json"
    if args.replot:
        report = json.loads(out.read_text())
        print(json.dumps(save(report["results"], report["specs"], out)))
        return
    if args.reprice:
        report = json.loads(out.read_text())
        for name, r in report["results"].items():
            if "device_work" not in r:
                raise SystemExit(f"{name}: no recorded device_work in {out}; run it again")
            spec = JobSpec.model_validate(report["specs"][name])
            r["populations"] = price_populations(name, spec, r["device_work"])
            own = r["populations"][spec.devices.population.preset]
            r["delay_s_per_round"], r["energy_j_per_round"] = own["delay_s_per_round"], own["energy_j_per_round"]
        print(json.dumps(save(report["results"], report["specs"], out)))
        return
    specs = variants(
        args.rounds, args.overrides, args.budgets or "pwff+budgets" in args.only, args.deadline, args.full_lr
    )
    if args.only:
        unknown = set(args.only.split(",")) - set(specs)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(specs)}")
        specs = {k: v for k, v in specs.items() if k in args.only.split(",")}
    cache_dir = Settings().cache_dir
    results: dict[str, dict[str, Any]] = {}
    spec_dumps = {name: spec.model_dump(mode="json") for name, spec in specs.items()}
    if args.only and out.is_file():
        report = json.loads(out.read_text())
        # Only rows of this report's shape (priced on both populations) are kept beside the new ones.
        kept = {name: r for name, r in report["results"].items() if "populations" in r and name not in specs}
        results.update(kept)
        spec_dumps = {**{name: report["specs"][name] for name in kept}, **spec_dumps}
    summary: dict[str, Any] = {}
    if args.lr_probe:
        (name, spec), *rest = specs.items()
        if rest:
            parser.error("--lr-probe: name one variant with --only")
        probe = lr_probe(spec, [float(r) for r in args.lr_probe.split(",")], cache_dir)
        probe_out = out.with_name(f"{out.stem}-lr-{name}.json")
        write_report(probe_out, probe["accuracy"], probe, {name: spec_dumps[name]})
        print(json.dumps(probe["accuracy"]))
        return
    if args.cold_start:
        report = json.loads(out.read_text())
        results = report["results"]
        for name, spec in specs.items():
            if name not in COLD_START or name not in results:
                parser.error(f"--cold-start: {name} has no cold start or no row in {out}")
            results[name]["cold_start"] = cold_start(spec, *load_states(cache_dir, spec, name), cache_dir)
            summary = save(results, report["specs"], out)
        print(json.dumps(summary))
        return
    for name, spec in specs.items():
        results[name] = run(name, spec, cache_dir)
        results = {n: results[n] for n in sorted(results, key=_order)}
        summary = save(results, {n: spec_dumps[n] for n in results}, out)  # a stopped run keeps what it has
        r = results[name]
        edge = r["populations"].get("cellular-edge", {})
        print(
            f"{name}: global {r['global_acc']:.4f}, personalized {r['personalized_acc']:.4f}, "
            f"{r['bytes_up_per_round']:,.0f} B/round up, "
            f"{r['delay_s_per_round']:.2f} s, {r['energy_j_per_round']:.1f} J"
            + (
                f" (cellular-edge {edge['delay_s_per_round']:.1f} s, {edge['energy_j_per_round']:.1f} J)"
                if edge
                else ""
            )
            + f" ({r['wall_s']:.0f}s)",
            flush=True,
        )
    print(json.dumps(summary))


def _order(name: str) -> tuple[int, str]:
    known = ("full", "none", "pwff", "fedsa", "pwff+budgets")
    return (known.index(name), name) if name in known else (len(known), name)


if __name__ == "__main__":
    main()
