"""Bytes on the wire per client per round: fwd seeds vs dense vs backprop deltas, and every update codec on
the quickstart job (bytes up and down, final and best accuracy, rounds to 0.90).

    .venv/bin/python bench/communication.py                          # both parts
    .venv/bin/python bench/communication.py --parts codecs --only int8,int4   # some codecs (results merge)
    .venv/bin/python bench/communication.py --parts fwd [--perturbations 64] [--rounds 1]
    .venv/bin/python bench/communication.py [--out DIR] [--set key=value ...]  # report folder, spec overrides

`--set` overrides apply to every job of both parts, after the bench's own settings (the tests run it
on `model=tiny-bert` with a few local steps).

Part `fwd` (as before): the same MiniLM-L6 LoRA job on BBC News (same clients, same seed) runs
embedded three times: `fwd` uploading (seed, g, loss) triples (pwff's default), `fwd` uploading the
client's dense gradient estimate as the FwdLLM reference code does, and backprop uploading its LoRA
delta. Both fwd variants perturb the same tensors the backprop job trains (LoRA + head), and every
tensor upload uses the job's default compression (float16 + zstd).

Part `codecs`: examples/quickstart.yaml (MiniLM-L6, LoRA r=8 on query/value + head, BBC News, 8
clients, Dirichlet(0.5), every client every round, 10 local AdamW steps) runs embedded with one worker
once per codec (`compression` block: see CODECS below). Per codec:

- `bytes_up_per_client_round`: what workers stored, `bytes_up / updates` of each committed round;
- `bytes_down_per_round`: what the worker actually downloaded over the job (the pwff_download_bytes_total
  counter: the initial state once, then each round's committed delta once; the clients' final
  evaluation reads the last one), divided by the rounds;
- `bytes_down_per_client_round`: the committed delta a client needs per round (the round record's
  `bytes_down / updates`, rounds 2 on; round 1 downloads the initial state);
- `today_bytes_down_per_round`: what each round cost before, every task fetching the whole float32 state
  (clients_per_round x the size of a committed state);
- final and best held-out accuracy, and the first round at or above 0.90.

Results are saved after every variant to bench/results/communication.json (or under `--out DIR`;
earlier variants' results in that folder are kept, so the codecs can be run a few at a time); the PNG
(communication.png, beside it) is redrawn from all of them; the last line on stdout is the summary:
{"fwd_seed_bytes", "fwd_dense_bytes", "backprop_bytes", "codecs": {name: {bytes_up_per_client_round,
bytes_down_per_round, final_accuracy}}}.
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

from bench.reports import add_overrides_option, write_report
from services.embedded import EmbeddedCluster
from shared.metrics import DOWNLOAD_BYTES
from shared.settings import Settings
from shared.spec import JobSpec, apply_overrides, load_spec_file, parse_spec
from shared.store import Keys

RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
TARGET = 0.90

CODECS: dict[str, dict[str, Any]] = {
    "float32": {"dtype": "float32", "download": "float32"},
    "float16": {"dtype": "float16", "download": "float16"},
    "int8": {"quantize": "int8", "download": "int8"},
    "int4": {"quantize": "int4", "download": "int4"},
    "int4+ef": {"quantize": "int4", "error_feedback": True, "download": "int4"},
    "int4-b256+ef": {"quantize": "int4", "block_size": 256, "error_feedback": True, "download": "int4"},
    "top0.6+int4+ef": {"topk": 0.6, "quantize": "int4", "error_feedback": True, "download": "int4"},
    "top0.5+int4+ef": {"topk": 0.5, "quantize": "int4", "error_feedback": True, "download": "int4"},
    "top0.25+int4+ef": {"topk": 0.25, "quantize": "int4", "error_feedback": True, "download": "int4"},
    "top0.1+int8+ef": {"topk": 0.1, "quantize": "int8", "error_feedback": True, "download": "int8"},
}


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


def fwd_variants(rounds: int, perturbations: int, overrides: list[str] | None = None) -> dict[str, JobSpec]:
    fwd = {
        "perturb": "all",
        "perturbations_per_task": perturbations,
        "max_perturbations_per_step": perturbations * 4,
        "variance_control": "fixed",
        "candidates": 2,
    }
    variants = {
        "fwd_seed": {**base_spec(rounds), "mode": "fwd", "fwd": {**fwd, "upload": "seeds"}},
        "fwd_dense": {**base_spec(rounds), "mode": "fwd", "fwd": {**fwd, "upload": "dense"}},
        "backprop": {**base_spec(rounds), "mode": "backprop"},
    }
    return {name: parse_spec(apply_overrides(data, overrides or [])) for name, data in variants.items()}


def codec_spec(name: str, rounds: int | None, extra: list[str] | None = None) -> JobSpec:
    overrides = [f"compression.{key}={json.dumps(value)}" for key, value in CODECS[name].items()]
    overrides.append(f"name=bench-codec-{name.replace('+', '-')}")
    if rounds is not None:
        overrides.append(f"rounds={rounds}")
    return load_spec_file(str(QUICKSTART), overrides + (extra or []))


def run(spec: JobSpec, cache_dir: Path) -> dict[str, Any]:
    downloaded = DOWNLOAD_BYTES._value.get()
    began = time.perf_counter()
    with EmbeddedCluster(cache_dir) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id)
        state = cluster.store.get(Keys().global_state(job_id, spec.rounds)) or b""
    if job["state"] != "succeeded":
        raise RuntimeError(f"{spec.name} job {job['state']}: {job.get('error')}")
    steps = [m for m in job["metrics"] if m["round"] > 0]
    per_update = [m["bytes_up"] / m["updates"] for m in steps]
    return {
        "bytes_per_client_per_round": statistics.mean(per_update),
        "per_round": per_update,
        "perturbations_per_update": [m.get("perturbations", 0) / m["updates"] for m in steps],
        "metrics": job["metrics"],
        "downloaded_bytes": DOWNLOAD_BYTES._value.get() - downloaded,
        "state_bytes": len(state),
        "wall_s": time.perf_counter() - began,
    }


def codec_figures(result: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    steps = [m for m in result["metrics"] if m["round"] > 0]
    accuracy = [m["accuracy"] for m in steps]
    reached = next((m["round"] for m in steps if m["accuracy"] >= TARGET), None)
    return {
        "bytes_up_per_client_round": statistics.mean(result["per_round"]),
        "bytes_down_per_round": result["downloaded_bytes"] / spec.rounds,
        "bytes_down_per_client_round": statistics.mean(m["bytes_down"] / m["updates"] for m in steps[1:])
        if len(steps) > 1
        else steps[0]["bytes_down"] / steps[0]["updates"],
        "today_bytes_down_per_round": spec.clients_per_round * result["state_bytes"],
        "download_delta_bytes": statistics.mean(m["download_delta_bytes"] for m in steps),
        "final_accuracy": accuracy[-1],
        "best_accuracy": max(accuracy),
        "accuracy_by_round": accuracy,
        "rounds_to_target": reached,
        "target": TARGET,
        "task_compute_s": statistics.mean(m["compute_s_sum"] / m["updates"] for m in steps),
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        f"{name}_bytes": round(results[name]["bytes_per_client_per_round"], 1)
        for name in ("fwd_seed", "fwd_dense", "backprop")
        if name in results
    }
    codecs = results.get("codecs", {})
    summary["codecs"] = {
        name: {
            "bytes_up_per_client_round": round(c["figures"]["bytes_up_per_client_round"], 1),
            "bytes_down_per_round": round(c["figures"]["bytes_down_per_round"], 1),
            "final_accuracy": round(c["figures"]["final_accuracy"], 4),
        }
        for name, c in codecs.items()
    }
    if "float32" in codecs:
        ref = codecs["float32"]["figures"]
        summary["vs_float32"] = {
            name: {
                "upload_reduction": round(
                    ref["bytes_up_per_client_round"] / c["figures"]["bytes_up_per_client_round"], 2
                ),
                "accuracy_points_lost": round(100 * (ref["final_accuracy"] - c["figures"]["final_accuracy"]), 2),
                "download_reduction_vs_today": round(
                    c["figures"]["today_bytes_down_per_round"] / c["figures"]["bytes_down_per_round"], 2
                ),
            }
            for name, c in codecs.items()
        }
    return summary


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    codecs = results.get("codecs", {})
    panels = 1 + (2 if codecs else 0)
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axis = axes[0][0]
    names = [n for n in ("fwd_seed", "fwd_dense", "backprop") if n in results]
    values = [results[n]["bytes_per_client_per_round"] for n in names]
    bars = axis.bar(names, values, color=["tab:green", "tab:orange", "tab:blue"][: len(names)])
    axis.set_yscale("log")
    axis.set_ylabel("bytes uploaded per client per round (log)")
    axis.set_title("fwd seeds vs dense vs backprop (small job)")
    for bar, value in zip(bars, values, strict=True):
        axis.annotate(f"{value:,.0f} B", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    if codecs:
        axis = axes[0][1]
        names = list(codecs)
        up = [codecs[n]["figures"]["bytes_up_per_client_round"] / 1024 for n in names]
        down = [codecs[n]["figures"]["bytes_down_per_round"] / 1024 for n in names]
        today = codecs[names[0]]["figures"]["today_bytes_down_per_round"] / 1024
        x = range(len(names))
        axis.bar([i - 0.2 for i in x], up, width=0.4, label="up, per client per round")
        axis.bar([i + 0.2 for i in x], down, width=0.4, label="down, per round (measured)")
        axis.axhline(today, color="tab:red", linestyle="--", label=f"down per round before ({today:,.0f} KB)")
        axis.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        axis.set_yscale("log")
        axis.set_ylabel("KB (log)")
        axis.set_title("Quickstart job: bytes by codec")
        axis.legend(fontsize=7)
        axis = axes[0][2]
        for name in names:
            acc = codecs[name]["figures"]["accuracy_by_round"]
            axis.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{name} ({acc[-1]:.3f})")
        axis.axhline(TARGET, color="gray", linestyle=":")
        axis.set_xlabel("round")
        axis.set_ylabel("held-out accuracy")
        axis.set_title("Quickstart job: accuracy by codec")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save(results: dict[str, Any], specs: dict[str, Any], out: Path = RESULTS) -> None:
    write_report(out / "communication.json", summarize(results), results, specs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="fwd,codecs", help="comma-separated: fwd, codecs")
    parser.add_argument("--perturbations", type=int, default=64, help="perturbations per fwd task (part fwd)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the part-fwd jobs")
    parser.add_argument("--codec-rounds", type=int, default=None, help="rounds of the codec jobs (default: the spec's)")
    parser.add_argument("--only", default=",".join(CODECS), help="comma-separated codec names (part codecs)")
    add_overrides_option(parser)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default bench/results)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cache_dir = Settings().cache_dir
    path = args.out / "communication.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results: dict[str, Any] = previous.get("results", {})
    specs: dict[str, Any] = previous.get("specs", {})
    parts = set(args.parts.split(","))
    if "fwd" in parts:
        for name, spec in fwd_variants(args.rounds, args.perturbations, args.overrides).items():
            outcome = run(spec, cache_dir)
            results[name] = {k: v for k, v in outcome.items() if k not in ("metrics",)}
            specs[name] = spec.model_dump(mode="json")
            print(f"{name}: {results[name]['bytes_per_client_per_round']:,.0f} bytes per client per round", flush=True)
            save(results, specs, args.out)
    if "codecs" in parts:
        codecs = results.setdefault("codecs", {})
        for name in args.only.split(","):
            spec = codec_spec(name, args.codec_rounds, args.overrides)
            outcome = run(spec, cache_dir)
            figures = codec_figures(outcome, spec)
            codecs[name] = {"figures": figures, "metrics": outcome["metrics"], "wall_s": outcome["wall_s"]}
            specs[f"codec:{name}"] = spec.model_dump(mode="json")
            print(
                f"{name}: up {figures['bytes_up_per_client_round']:,.0f} B/client/round, down "
                f"{figures['bytes_down_per_round']:,.0f} B/round "
                f"(before {figures['today_bytes_down_per_round']:,.0f}), "
                f"final {figures['final_accuracy']:.4f}, best {figures['best_accuracy']:.4f}, "
                f">= {TARGET} at round {figures['rounds_to_target']}, {outcome['wall_s']:.0f} s",
                flush=True,
            )
            save(results, specs, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "communication.png")
    print(json.dumps(summarize(results)))


if __name__ == "__main__":
    main()
