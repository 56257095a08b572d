"""Secure aggregation's cost: bytes and time per round with and without it, and the final adapter's
difference from the unmasked run.

    flock /tmp/pwff-bench.lock .venv/bin/python bench/secagg.py [--rounds 3] [--only plain,secagg-32]
    .venv/bin/python bench/secagg.py --model tiny-bert --name secagg-tiny    # the same jobs on tiny-bert, seconds

examples/quickstart.yaml (MiniLM-L6, LoRA r=8 on query/value + head, BBC News, 8 clients, all of them
every round, 10 local AdamW steps) runs embedded with one worker, `--rounds` rounds, once per variant:

- `plain`: the quickstart job (float16 uploads, FedAvg weighted by examples);
- `secagg-32`, `secagg-62`: the same job with `secure_aggregation` at 32 and 62 bits (each upload a
  vector of uint32 / uint64 masked integers; four waves per round: advertise, share, mask, unmask);
- `plain-int8`, `secagg-int8-32`: int8-quantized uploads, without and with secure aggregation at 32 bits
  (masks over the fixed-point integers of the quantized values).

Per variant: bytes uploaded per client per round (every wave's uploads: keys, encrypted shares, the
masked vector, revealed shares), what the worker downloaded over the job (global state, deltas, and
under secure aggregation its peers' advertisements and share uploads, read whole from the store),
seconds per round (the round's open to commit, which includes the server's evaluation), the
commit's own seconds (unmasking), and the final adapter's largest difference from its unmasked
counterpart. Writes bench/results/secagg.json and .png (`--name` NAME: NAME.json and NAME.png; `--out`
names another folder); the last stdout line is the summary. `--set key=value` overrides a field of every
variant's spec (`--rounds`, `--model` and what makes the variant take precedence).
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

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.reports import write_report
from services.embedded import EmbeddedCluster
from shared.codec import decode_tensors
from shared.metrics import DOWNLOAD_BYTES
from shared.settings import Settings
from shared.spec import JobSpec, load_spec_file
from shared.store import Keys

RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"

VARIANTS: dict[str, tuple[dict[str, Any], str | None]] = {
    # name: (overrides, the unmasked variant it is compared with)
    "plain": ({}, None),
    "secagg-32": ({"secure_aggregation": {"enabled": True, "bits": 32}}, "plain"),
    "secagg-62": ({"secure_aggregation": {"enabled": True, "bits": 62}}, "plain"),
    "plain-int8": ({"compression": {"quantize": "int8"}}, None),
    "secagg-int8-32": (
        {"compression": {"quantize": "int8"}, "secure_aggregation": {"enabled": True, "bits": 32}},
        "plain-int8",
    ),
}


def variant_spec(name: str, rounds: int, model: str | None, extra: list[str] | None = None) -> JobSpec:
    overrides = [f"name=bench-{name}", f"rounds={rounds}"] + ([f"model={model}"] if model else [])
    for section, values in VARIANTS[name][0].items():
        overrides += [f"{section}.{key}={json.dumps(value)}" for key, value in values.items()]
    return load_spec_file(str(QUICKSTART), [*(extra or []), *overrides])


def run(spec: JobSpec, cache_dir: Path) -> dict[str, Any]:
    downloaded = DOWNLOAD_BYTES._value.get()
    began = time.perf_counter()
    with EmbeddedCluster(cache_dir) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id)
        blob = cluster.store.get(Keys().global_state(job_id, spec.rounds))
    if job["state"] != "succeeded" or blob is None:
        raise RuntimeError(f"{spec.name} job {job['state']}: {job.get('error')}")
    steps = [m for m in job["metrics"] if m["round"] > 0]
    return {
        "bytes_up_per_client_round": statistics.mean(m["bytes_up"] / spec.clients_per_round for m in steps),
        "downloaded_bytes_per_round": (DOWNLOAD_BYTES._value.get() - downloaded) / spec.rounds,
        "round_s": statistics.mean(m["duration_s"] for m in steps),
        "commit_s": statistics.mean(m["aggregate_s"] for m in steps),
        "compute_s_sum_per_round": statistics.mean(m["compute_s_sum"] for m in steps),
        "updates_per_round": statistics.mean(m["updates"] for m in steps),
        "final_accuracy": steps[-1]["accuracy"],
        "wall_s": time.perf_counter() - began,
        "metrics": job["metrics"],
        "state": decode_tensors(blob),
    }


def plot(results: dict[str, Any], path: Path, specs: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [
        ("bytes_up_per_client_round", "bytes up per client per round", 1.0),
        ("round_s", "seconds per round (open to commit)", 1.0),
        ("max_abs_diff", "final adapter: max |diff| vs unmasked", 1.0),
    ]
    for axis, (key, title, _) in zip(axes, panels, strict=True):
        values = [float(results[n].get(key) or 0.0) for n in names]
        axis.bar(names, values, color=["#888" if "plain" in n else "#3a7" for n in names])
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=30)
        if key == "max_abs_diff":
            axis.set_yscale("symlog", linthresh=1e-12)
    first = next(iter(specs.values()))
    fig.suptitle(f"Secure aggregation on the quickstart job ({first['model']} LoRA, {first['num_clients']} clients)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variant names")
    parser.add_argument("--model", default=None, help="another model than the quickstart's (e.g. tiny-bert)")
    parser.add_argument("--set", action="append", default=[], help="override a spec field: key=value (repeatable)")
    parser.add_argument("--name", default="secagg", help="report file stem: NAME.json and NAME.png")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    args = parser.parse_args()
    unknown = [name for name in args.only.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cache_dir = Settings().cache_dir
    results: dict[str, Any] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    specs: dict[str, Any] = {}
    names = args.only.split(",")
    # Unmasked references first, so each secure run is compared as soon as it ends.
    for name in sorted(names, key=lambda n: VARIANTS[n][1] is not None):
        spec = variant_spec(name, args.rounds, args.model, args.set)
        outcome = run(spec, cache_dir)
        states[name] = outcome.pop("state")
        reference = VARIANTS[name][1]
        if reference in states:
            outcome["compared_with"] = reference
            outcome["max_abs_diff"] = max(
                float((states[name][n] - states[reference][n]).abs().max()) for n in states[reference]
            )
            base = results[reference]
            outcome["bytes_up_ratio"] = outcome["bytes_up_per_client_round"] / base["bytes_up_per_client_round"]
            outcome["round_s_ratio"] = outcome["round_s"] / base["round_s"]
        results[name] = outcome
        specs[name] = spec.model_dump(mode="json")
        print(
            f"{name}: {outcome['bytes_up_per_client_round']:,.0f} B up/client/round, "
            f"{outcome['round_s']:.1f} s/round (commit {outcome['commit_s']:.2f} s), "
            f"final accuracy {outcome['final_accuracy']:.4f}, max |diff| {outcome.get('max_abs_diff', 0.0):.3g}",
            flush=True,
        )
    summary = {
        name: {
            key: round(value, 12) if key == "max_abs_diff" else round(value, 3)
            for key, value in result.items()
            if key in ("bytes_up_per_client_round", "round_s", "bytes_up_ratio", "round_s_ratio", "max_abs_diff")
        }
        for name, result in results.items()
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out / f"{args.name}.json", summary, results, specs)
    plot(results, args.out / f"{args.name}.png", specs)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
