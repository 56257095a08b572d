"""Bytes uploaded per client per round: fwd with seeds, fwd with dense estimates, backprop deltas.

    .venv/bin/python bench/communication.py [--perturbations 64] [--rounds 1]

The same MiniLM-L6 LoRA job on BBC News (same clients, same seed) runs embedded three times:
`fwd` uploading (seed, g, loss) triples (pwff's default), `fwd` uploading the client's dense
gradient estimate as the FwdLLM reference code does, and backprop uploading its LoRA delta.
Both fwd variants perturb the same tensors the backprop job trains (LoRA + head), and every
tensor upload uses the job's default compression (float16 + zstd). Bytes are what workers
actually stored (`bytes_up / updates` of each committed round).

Writes bench/results/communication.json and .png; the last line on stdout is the summary:
{"fwd_seed_bytes": ..., "fwd_dense_bytes": ..., "backprop_bytes": ...} per client per round.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from services.embedded import EmbeddedCluster
from shared.settings import Settings
from shared.spec import JobSpec, parse_spec

RESULTS = Path(__file__).resolve().parent / "results"


def base_spec(rounds: int) -> dict[str, Any]:
    return {
        "name": "bench-communication",
        "model": "minilm-l6",
        "dataset": "bbc-news",
        "num_clients": 8,
        "clients_per_round": 4,
        "rounds": rounds,
        "local_steps": 4,
        "batch_size": 8,
        "max_length": 32,
        "eval_max_examples": 32,
        "seed": 0,
    }


def variants(rounds: int, perturbations: int) -> dict[str, JobSpec]:
    fwd = {
        "perturb": "all",
        "perturbations_per_task": perturbations,
        "max_perturbations_per_step": perturbations * 4,
        "variance_control": "fixed",
        "candidates": 2,
    }
    return {
        "fwd_seed": parse_spec({**base_spec(rounds), "mode": "fwd", "fwd": {**fwd, "upload": "seeds"}}),
        "fwd_dense": parse_spec({**base_spec(rounds), "mode": "fwd", "fwd": {**fwd, "upload": "dense"}}),
        "backprop": parse_spec({**base_spec(rounds), "mode": "backprop"}),
    }


def run(spec: JobSpec, cache_dir: Path) -> dict[str, Any]:
    with EmbeddedCluster(cache_dir) as cluster:
        job = cluster.wait(cluster.scheduler.submit(spec))
    if job["state"] != "succeeded":
        raise RuntimeError(f"{spec.mode} job {job['state']}: {job.get('error')}")
    steps = [m for m in job["metrics"] if m["round"] > 0]
    per_update = [m["bytes_up"] / m["updates"] for m in steps]
    return {
        "bytes_per_client_per_round": statistics.mean(per_update),
        "per_round": per_update,
        "perturbations_per_update": [m.get("perturbations", 0) / m["updates"] for m in steps],
    }


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    values = [results[n]["bytes_per_client_per_round"] for n in names]
    figure, axis = plt.subplots(figsize=(7, 4))
    bars = axis.bar(names, values, color=["tab:green", "tab:orange", "tab:blue"])
    axis.set_yscale("log")
    axis.set_ylabel("bytes uploaded per client per round (log)")
    axis.set_title("Upload per client per round, MiniLM-L6 LoRA + head on BBC News")
    for bar, value in zip(bars, values, strict=True):
        axis.annotate(f"{value:,.0f} B", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--perturbations", type=int, default=64, help="perturbations per fwd task")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache_dir = Settings().cache_dir
    results: dict[str, dict[str, Any]] = {}
    for name, spec in variants(args.rounds, args.perturbations).items():
        began = time.perf_counter()
        results[name] = {**run(spec, cache_dir), "wall_s": time.perf_counter() - began}
        print(f"{name}: {results[name]['bytes_per_client_per_round']:,.0f} bytes per client per round", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {f"{name}_bytes": round(r["bytes_per_client_per_round"], 1) for name, r in results.items()}
    report = {
        "summary": summary,
        "results": results,
        "specs": {
            name: spec.model_dump(mode="json") for name, spec in variants(args.rounds, args.perturbations).items()
        },
        "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()},
    }
    (RESULTS / "communication.json").write_text(json.dumps(report, indent=2))
    plot(results, RESULTS / "communication.png")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
