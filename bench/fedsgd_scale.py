"""FwdLLM's many-client regime: hundreds of tiny clients per FedSGD round, one task per client vs batched.

    flock /tmp/pwff-bench.lock env PWFF_TORCH_THREADS=1 .venv/bin/python bench/fedsgd_scale.py
    flock /tmp/pwff-bench.lock env PWFF_TORCH_THREADS=1 .venv/bin/python bench/fedsgd_scale.py \\
        --clients 200 --rounds 5 --batches 1,25

The job is FwdLLM's (`fwd.regime: fedsgd`): real MiniLM-L6 on BBC News, `--clients` clients of an iid
shard each (1,781 training examples: ~9 each at 200), every client in every round, one perturbation
per client (so a round's gradient is estimated from `--clients` directions), perturbing the classifier
head, fixed variance control (one wave per round). It runs once per `--batches` value of
`clients_per_task` (1: one task per client, as before batches existed), each on a fresh cluster of the
real services as separate processes over the real RabbitMQ and Redis (private namespaces) with
`--workers` workers, each with PWFF_TORCH_THREADS as the environment gives it (1 in the commands above).

Per round, from the job view: its wall time (the scheduler's open-to-commit `duration_s`), the
workers' compute (the sum of the updates' `compute_s` divided by the number of workers: what the round
would take if only the clients' own computation counted), the orchestration overhead (the difference:
messaging, per-task setup, waiting, merging, the commit and its evaluation, broken out as `aggregate_s`
and `eval_s`), and the global accuracy on `--eval` held-out examples. In this regime a task runs the
frozen encoder once over its client's minibatch every round (the shard-feature cache serves
`fwd.regime: local` only), so a client's compute is one MiniLM forward over ~9 examples plus its
perturbed head passes. Round 1 also pays each worker's first model load and warm-up: the steady
figures are over rounds 2..R.

The runs must commit bit-identical global states (batches change how clients travel, not what they
compute): `same_state` says whether they did. Once the last round is committed the job is cancelled:
the final per-client evaluation (one EvaluateTask per client, which publishes each client's model) is
not part of what is measured.

`--set key=value` (repeatable, dotted keys) overrides fields of that job after the options above have
built it, e.g. `--set model=tiny-bert` (the tests run it so, at a few clients).

Writes bench/results/fedsgd-scale.json and .png (or `--out DIR`, `--name NAME`); the last line on stdout is
a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root (tests/) is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.reports import add_overrides_option, write_report
from shared.codec import decode_tensors
from shared.settings import Settings
from shared.spec import JobSpec, apply_overrides
from shared.state import Repositories
from shared.store.redis import RedisStore
from tests.harness import ServiceCluster

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
FINAL = ("succeeded", "failed", "cancelled")


def scale_spec(clients: int, rounds: int, clients_per_task: int, eval_examples: int) -> dict[str, Any]:
    return {
        "name": f"fedsgd-scale-k{clients_per_task}",
        "model": "minilm-l6",
        "dataset": "bbc-news",
        "mode": "fwd",
        "partition": {"kind": "iid", "min_examples": 1},
        "num_clients": clients,
        "clients_per_round": clients,
        "clients_per_task": clients_per_task,
        "rounds": rounds,
        "batch_size": 16,  # more than a client has at 200 clients: each task reads its whole shard
        "max_length": 64,
        "eval_max_examples": eval_examples,
        "round_deadline_s": 3600,
        "seed": 0,
        "fwd": {
            "regime": "fedsgd",
            "perturb": "head",
            "perturbations_per_task": 1,
            "candidates": 10,
            "discriminative": True,
            "variance_control": "fixed",
            "max_perturbations_per_step": max(clients, 1),
            "lr": 0.5,
            "momentum": 0.9,
        },
    }


def run_once(spec_data: dict[str, Any], workers: int, log_dir: Path, timeout_s: float) -> dict[str, Any]:
    """One job on a fresh cluster, followed until its last round commits; per-round figures."""
    spec = JobSpec.model_validate(spec_data)
    started = time.monotonic()
    cluster = ServiceCluster(log_dir, Settings().cache_dir, workers=workers)
    store = RedisStore(cluster.settings.redis_url)
    repos = Repositories(store, cluster.namespace)
    try:
        startup_s = time.monotonic() - started
        submitted = time.monotonic()
        job_id = cluster.submit(spec_data)
        job: dict[str, Any] = {}
        seen_at: dict[int, float] = {}
        with cluster.api() as api:
            while time.monotonic() - submitted < timeout_s:
                job = api.get(f"/v1/jobs/{job_id}").json()
                for entry in job["metrics"]:
                    seen_at.setdefault(int(entry["round"]), time.monotonic())
                # The round's record is written by the aggregator's commit; its `duration_s` once the scheduler
                # has handled that commit too (a moment later).
                last = [entry for entry in job["metrics"] if entry["round"] == spec.rounds and "duration_s" in entry]
                if last or job["state"] in FINAL:
                    break
                time.sleep(0.1)
            else:
                raise TimeoutError(f"job {job_id} not done after {timeout_s}s; logs in {log_dir}")
            if job["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {job_id} {job['state']}: {job.get('error')}; logs in {log_dir}")
            blob = repos.tensors.global_state(job_id, spec.rounds)
            if blob is None:
                raise RuntimeError(f"no committed state for round {spec.rounds} of {job_id}")
            final_state = decode_tensors(blob)
            api.delete(f"/v1/jobs/{job_id}")  # skip the final per-client evaluation fan-out
        tasks_done = sum(
            cluster.metric(port, 'pwff_tasks_processed_total{outcome="done"}') for port in cluster.worker_metric_ports
        )
    finally:
        store.close()
        cluster.close()

    per_round: list[dict[str, Any]] = []
    for entry in job["metrics"]:
        if entry["round"] < 1:
            continue
        compute_s = float(entry.get("compute_s_sum", 0.0)) / workers
        wall_s = float(entry["duration_s"])
        per_round.append(
            {
                "round": int(entry["round"]),
                "updates": int(entry["updates"]),
                "wall_s": wall_s,
                "workers_compute_s": compute_s,
                "overhead_s": wall_s - compute_s,
                "aggregate_s": float(entry.get("aggregate_s", 0.0)),
                "eval_s": float(entry.get("eval_s", 0.0)),
                "accuracy": float(entry["accuracy"]),
                "perturbations": int(entry.get("perturbations", 0)),
            }
        )
    steady = per_round[1:] or per_round
    return {
        "clients_per_task": spec.clients_per_task,
        "job_id": job_id,
        "startup_s": startup_s,
        "untrained_accuracy": float(job["metrics"][0]["accuracy"]),
        "rounds_s": seen_at[spec.rounds] - seen_at[0],
        "rounds_per_min": 60 * spec.rounds / sum(r["wall_s"] for r in per_round),
        "steady_rounds_per_min": 60 * len(steady) / sum(r["wall_s"] for r in steady),
        "steady_overhead_s": sum(r["overhead_s"] for r in steady) / len(steady),
        "steady_workers_compute_s": sum(r["workers_compute_s"] for r in steady) / len(steady),
        "steady_overhead_ms_per_client": 1000 * sum(r["overhead_s"] for r in steady) / len(steady) / spec.num_clients,
        "tasks_done": tasks_done,
        "per_round": per_round,
        "final_state": final_state,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(results)
    for index, result in enumerate(results):
        rounds = [r["round"] + (index - (len(results) - 1) / 2) * width for r in result["per_round"]]
        label = f"clients_per_task={result['clients_per_task']}"
        left.bar(rounds, [r["workers_compute_s"] for r in result["per_round"]], width, color=f"C{index}", alpha=0.5)
        left.bar(
            rounds,
            [r["overhead_s"] for r in result["per_round"]],
            width,
            bottom=[r["workers_compute_s"] for r in result["per_round"]],
            color=f"C{index}",
            label=f"{label}: overhead (on top of compute)",
        )
        right.plot(
            [0] + [r["round"] for r in result["per_round"]],
            [result["untrained_accuracy"]] + [r["accuracy"] for r in result["per_round"]],
            marker="o",
            color=f"C{index}",
            label=label,
        )
    left.set(xlabel="round", ylabel="seconds", title="round wall: workers' compute (pale) + orchestration overhead")
    left.legend(fontsize=8)
    right.set(xlabel="round", ylabel="global accuracy", title="accuracy per round (held-out)")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,25", help="clients_per_task values, comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eval", type=int, default=256, help="held-out examples the aggregator evaluates per round")
    parser.add_argument("--timeout", type=float, default=900, help="per run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default bench/results)")
    parser.add_argument("--name", default="fedsgd-scale", help="report file name (without extension)")
    add_overrides_option(parser)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    specs: dict[str, Any] = {}
    for clients_per_task in (int(value) for value in args.batches.split(",")):
        spec_data = apply_overrides(scale_spec(args.clients, args.rounds, clients_per_task, args.eval), args.overrides)
        specs[f"k{clients_per_task}"] = spec_data
        log_dir = Path(tempfile.mkdtemp(prefix="pwff-fedsgd-scale-"))
        results.append(run_once(spec_data, args.workers, log_dir, args.timeout))
        shutil.rmtree(log_dir, ignore_errors=True)
    reference = results[0]["final_state"]
    same_state = all(
        result["final_state"].keys() == reference.keys()
        and all(torch.equal(result["final_state"][name], value) for name, value in reference.items())
        for result in results[1:]
    )
    for result in results:
        del result["final_state"]
    summary = {
        "clients": args.clients,
        "rounds": args.rounds,
        "workers": args.workers,
        "same_state": same_state,
        **{
            f"k{r['clients_per_task']}": {
                "rounds_per_min": round(r["rounds_per_min"], 2),
                "steady_rounds_per_min": round(r["steady_rounds_per_min"], 2),
                "steady_overhead_s": round(r["steady_overhead_s"], 2),
                "steady_workers_compute_s": round(r["steady_workers_compute_s"], 2),
                "steady_overhead_ms_per_client": round(r["steady_overhead_ms_per_client"], 1),
                "accuracy": [round(r["untrained_accuracy"], 3)] + [round(x["accuracy"], 3) for x in r["per_round"]],
            }
            for r in results
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out / f"{args.name}.json", summary, {"runs": results}, specs)
    plot(results, args.out / f"{args.name}.png")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
