"""Peak memory of ONE training step: backprop LoRA vs forward gradients (FwdLLM `fd` and `jvp`, local steps).

    .venv/bin/python bench/memory.py                                   # both models, batch 8 x 256 tokens
    .venv/bin/python bench/memory.py --models smollm2-135m --batch 8 --tokens 256 --repeat 1
    .venv/bin/python bench/memory.py --from-json bench/results/memory.json   # redraw the figure only
    .venv/bin/python bench/memory.py --models smollm2-135m --batch 16 --repeat 1 --name memory-b16
    .venv/bin/python bench/memory.py --models smollm2-135m --batch 16 --repeat 1 --name memory-b16 \
        --modes backprop,fd,jvp,fd-local,fd-local-pool --seed-pool 100     # with the pool upload too
    .venv/bin/python bench/memory.py --name memory-batches \
        --batches-from bench/results/memory.json,bench/results/memory-b16.json,bench/results/memory-b32.json

Every (model, mode) runs in its own fresh process (`bench/memory.py --child MODEL MODE ...`),
so no mode inherits another's allocator state; each is repeated `--repeat` times (interleaved
with the other modes) and the median is reported, because glibc's heap keeps a varying amount
of freed memory resident (the same step's peak differs by up to ~200 MB from run to run).
Each child does what a worker does for one task, through the project's real code paths:

- the model from `shared.models.build_peft_model(spec, cache_dir)` (frozen float32 base + LoRA;
  `jvp` gets eager attention, as `shared.models.attention_for` decides), its trainable state set
  from `shared.models.initial_state` with `load_trainable_state`, as the worker does;
- the data from `shared.data.client_examples(spec, 0)`, keeping the examples that fill the whole
  `--tokens` window, so every mode sees a batch of exactly `--batch` x `--tokens` tokens;
- backprop: `shared.modes.backprop.train_backprop(..., steps=1)` (AdamW);
- fd / jvp: `shared.modes.fwd.forward_task(..., perturbations=1)` with one candidate and
  discriminative sampling off (no candidate scoring);
- fd-local: `shared.modes.fwd.forward_local_steps(..., steps=1)` under `fwd.regime: local` and
  `fwd.upload: seeds`: one local zeroth-order step of one `fd` perturbation (fixed variance control,
  no discriminative sampling), the trajectory a local-regime worker uploads;
- fd-local-pool (only with `--modes`): the same step under `fwd.upload: pool` with `--seed-pool`
  seeds, which holds the whole pool's directions (seed_pool x perturbed dim, float32 and a float64
  copy) for the task: what the pool upload costs in memory.

`backprop` is always measured (every ratio is against it); `--modes` picks the others (default
backprop, fd, jvp, fd-local). Reports written before fd-local existed still redraw (`--from-json`).

The headline number is the whole-process peak resident set size (`ru_maxrss` of the child as the
parent's `wait4` reports it): interpreter, torch/transformers/peft, tokenizer, data, model and the
step. The child also reports its RSS after the imports, after the data, after the model load and
with every weight read once (the floor any step starts from), and the peak of the step alone
(VmHWM reset through /proc/self/clear_refs just before it).

The child sets up its allocator as every service does (`shared.allocator`, from
`PWFF_MALLOC_MMAP_THRESHOLD`, 1 MiB by default; 0 for glibc's own behaviour).

Writes bench/results/memory.json and memory.png (or NAME.json and NAME.png); prints one JSON summary line per model, the
SmolLM2 line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
MODES = ("backprop", "fd", "jvp")
"""The FedSGD-regime comparison every report holds (older reports hold only these)."""
LOCAL_MODES = ("fd-local", "fd-local-pool")
"""Local-regime modes (`fwd.regime: local`), one local step each; fd-local-pool with the pool upload."""
ALL_MODES = MODES + LOCAL_MODES
DEFAULT_MODES = ("backprop", "fd", "jvp", "fd-local")
DEFAULT_SEED_POOL = 100
"""fd-local-pool's pool: moderate, since the step holds seed_pool x dim directions (12 bytes each)."""
DATASETS = {
    "smollm2-135m": "jane-austen",
    "minilm-l6": "bbc-news",
    "tiny-bert": "bbc-news",
    "tiny-llama": "jane-austen",
}
CHILD_MARK = "MEMORY-CHILD "
MB = 1024 * 1024


# -- measuring inside the child ---------------------------------------------------------------


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: now, VmHWM: the high-water mark)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); ru_maxrss is not affected."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples this process's RSS in a thread, to see when in the step the peak falls."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = 0.0

    def _run(self) -> None:
        page_mb = os.sysconf("SC_PAGE_SIZE") / MB
        with open("/proc/self/statm", encoding="ascii") as handle:
            while not self._stop.is_set():
                handle.seek(0)
                rss = int(handle.read().split()[1]) * page_mb
                self.samples.append((time.perf_counter() - self._start, rss))
                self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self) -> float:
        return max((rss for _, rss in self.samples), default=0.0)

    def timeline(self, points: int = 120) -> list[list[float]]:
        """At most `points` (t, rss) pairs: the max of each time slice, so peaks survive."""
        if not self.samples:
            return []
        end = self.samples[-1][0] or 1.0
        slices: dict[int, tuple[float, float]] = {}
        for t, rss in self.samples:
            key = min(points - 1, int(t / end * points))
            if key not in slices or rss > slices[key][1]:
                slices[key] = (t, rss)
        return [[round(t, 3), round(rss, 1)] for t, rss in (slices[k] for k in sorted(slices))]


def mode_key(mode: str) -> str:
    """A mode's name as a summary key prefix: `fd-local` -> `fd_local`."""
    return mode.replace("-", "_")


def present_modes(runs: dict[str, Any]) -> list[str]:
    """The modes a report holds, in the order of ALL_MODES (older reports lack the local ones)."""
    return [mode for mode in ALL_MODES if mode in runs]


def spec_fields(model: str, mode: str, batch: int, tokens: int, seed_pool: int = DEFAULT_SEED_POOL) -> dict[str, Any]:
    """The job spec of a measurement: the same model, data, batch and length for every mode."""
    fields: dict[str, Any] = {
        "name": "memory-bench",
        "model": model,
        "dataset": DATASETS[model],
        "mode": "backprop" if mode == "backprop" else "fwd",
        "num_clients": 8,
        "clients_per_round": 1,
        "partition": {"kind": "iid"},
        "batch_size": batch,
        "max_length": tokens,
        "local_steps": 1,
        "seed": 0,
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    }
    if mode in ("fd", "jvp"):
        fields["fwd"] = {
            "estimator": mode,
            "perturbations_per_task": 1,
            "candidates": 1,
            "discriminative": False,
            "upload": "seeds",
        }
    elif mode in LOCAL_MODES:
        fields["fwd"] = {
            "estimator": "fd",
            "regime": "local",
            "upload": "pool" if mode == "fd-local-pool" else "seeds",
            "perturbations_per_local_step": 1,
            "max_perturbations_per_local_step": 1,
            "variance_control": "fixed",
            "candidates": 1,
            "discriminative": False,
        }
        if mode == "fd-local-pool":
            fields["fwd"]["seed_pool"] = seed_pool
    elif mode != "backprop":
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(ALL_MODES)}")
    return fields


def child(model_name: str, mode: str, batch: int, tokens: int, seed_pool: int = DEFAULT_SEED_POOL) -> dict[str, Any]:
    """One step of `mode` in this (fresh) process; returns what was measured."""
    rss_start = _rss_mb()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from shared.adapters import build_peft_model
    from shared.allocator import set_mmap_threshold
    from shared.catalog import model_info
    from shared.data import client_examples
    from shared.forward_grad import ParamSpace, decode_seed_scalars
    from shared.models import describe, device, initial_state, load_tokenizer, load_trainable_state
    from shared.modes.backprop import train_backprop
    from shared.modes.fwd import forward_local_steps, forward_task
    from shared.seeding import derive_seed
    from shared.settings import Settings
    from shared.spec import parse_spec

    rss_imports = _rss_mb()
    settings = Settings()
    # What `configure_process` does in a worker after its imports (logging aside).
    mmap_threshold = settings.malloc_mmap_threshold if set_mmap_threshold(settings.malloc_mmap_threshold) else None
    spec = parse_spec(spec_fields(model_name, mode, batch, tokens, seed_pool))
    cache_dir = settings.cache_dir
    task = model_info(spec.model).task
    tokenizer = load_tokenizer(spec.model, cache_dir)
    # Examples that fill the whole window: every batch is exactly batch x tokens, in every mode.
    examples = [e for e in client_examples(spec, 0) if len(tokenizer(e.text)["input_ids"]) >= tokens]
    if len(examples) < batch:
        raise SystemExit(f"client 0 has only {len(examples)} examples of >= {tokens} tokens; need {batch}")
    rss_data = _rss_mb()

    model = build_peft_model(spec, cache_dir).to(device())
    load_trainable_state(model, initial_state(model, spec.seed))
    rss_model = _rss_mb()
    # The weights may be mapped from the cached safetensors file and paged in only when a pass
    # first reads them; every mode reads all of them, so paging them in now changes no peak but
    # makes the floor before the step the model's real resident cost.
    with torch.no_grad():
        for param in model.parameters():
            float(param.sum())
    rss_resident = _rss_mb()
    # The dimension forward modes perturb: the pool upload holds seed_pool rows of it.
    perturbed_dim = (
        ParamSpace.from_state({n: p for n, p in model.named_parameters() if p.requires_grad}, spec.fwd.perturb).dim
        if spec.mode == "fwd"
        else None
    )
    peak_before_step = _maxrss_mb()
    hwm_reset = _reset_hwm()

    outcome: dict[str, Any] = {}
    began = time.perf_counter()
    with RssSampler() as sampler:
        if mode == "backprop":
            seed = derive_seed("train", spec.seed, 0, 0)
            trained = train_backprop(model, tokenizer, examples, spec, task, 1, seed)
            outcome["loss"] = trained.loss
        elif mode in LOCAL_MODES:
            local = forward_local_steps(
                model, tokenizer, examples, spec, task, round_=0, client=0, wave=0, steps=1
            )  # fmt: skip
            outcome["loss"] = float(sum(local.losses) / len(local.losses))
            outcome["g"] = (
                [float(x) for x in local.coefficients]
                if local.coefficients is not None
                else [float(x) for step in local.steps for x in step.grads]
            )
        else:
            result = forward_task(
                model,
                tokenizer,
                examples,
                spec,
                task,
                round_=0,
                client=0,
                wave=0,
                perturbations=1,
                reference=None,
            )
            scalars = decode_seed_scalars(result.payload)
            outcome["loss"] = result.loss
            outcome["g"] = [float(x) for x in scalars.grads]
    step_s = time.perf_counter() - began
    step_hwm = _status_kb("VmHWM") / 1024 if hwm_reset else None
    return {
        "model": model_name,
        "mode": mode,
        "peak_mb": _maxrss_mb(),
        "rss_start_mb": rss_start,
        "rss_after_imports_mb": rss_imports,
        "rss_after_data_mb": rss_data,
        "rss_after_model_mb": rss_model,
        "rss_model_resident_mb": rss_resident,
        "peak_before_step_mb": peak_before_step,
        "step_peak_mb": step_hwm,
        "step_peak_sampled_mb": sampler.peak(),
        "rss_after_step_mb": _rss_mb(),
        "step_s": step_s,
        "timeline": sampler.timeline(),
        "batch_shape": [batch, tokens],
        "examples_available": len(examples),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype),
        "perturbed_dim": perturbed_dim,
        "seed_pool": spec.fwd.seed_pool if spec.mode == "fwd" and spec.fwd.upload == "pool" else None,
        "torch_threads": torch.get_num_threads(),
        "malloc_mmap_threshold": mmap_threshold,
        **describe(model),
        **outcome,
    }


# -- the parent: one fresh process per (model, mode) -----------------------------------------


def run_child(model: str, mode: str, batch: int, tokens: int, seed_pool: int = DEFAULT_SEED_POOL) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        model,
        mode,
        "--batch",
        str(batch),
        "--tokens",
        str(tokens),
        "--seed-pool",
        str(seed_pool),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=REPO)
        # wait4 gives this child's own rusage: ru_maxrss is its whole-process peak RSS (kB on Linux).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        sys.stderr.write(stderr)
        raise RuntimeError(f"{model} {mode}: child exited with {process.returncode}")
    lines = [line for line in stdout.splitlines() if line.startswith(CHILD_MARK)]
    if not lines:
        sys.stderr.write(stderr)
        raise RuntimeError(f"{model} {mode}: child printed no result")
    result: dict[str, Any] = json.loads(lines[-1][len(CHILD_MARK) :])
    result["self_reported_peak_mb"] = result.pop("peak_mb")
    result["peak_mb"] = usage.ru_maxrss / 1024
    return result


def combine(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's repeats: the run with the median whole-process peak, plus every repeat's peak."""
    ordered = sorted(repeats, key=lambda run: run["peak_mb"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    peaks = [run["peak_mb"] for run in repeats]
    median["peaks_mb"] = peaks
    median["peak_min_mb"], median["peak_max_mb"] = min(peaks), max(peaks)
    median["step_peaks_mb"] = [run["step_peak_mb"] for run in repeats]
    losses = {json.dumps([run.get("loss"), run.get("g")]) for run in repeats}
    median["deterministic"] = len(losses) == 1
    return median


def summarize(model: str, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each measured mode's whole-process peak and backprop's multiple of it (keys in the order of
    ALL_MODES: the FedSGD modes' first, as before the local modes existed), plus the local modes'
    step-alone ratios, so the summary line carries every figure the goals name."""
    backprop = runs["backprop"]["peak_mb"]
    forward = [mode for mode in present_modes(runs) if mode != "backprop"]
    summary: dict[str, Any] = {"model": model, "backprop_peak_mb": round(backprop, 1)}
    summary.update({f"{mode_key(mode)}_peak_mb": round(runs[mode]["peak_mb"], 1) for mode in forward})
    summary.update({f"{mode_key(mode)}_ratio": round(backprop / runs[mode]["peak_mb"], 2) for mode in forward})
    steps = step_ratios(runs)
    summary.update({key: value for key, value in steps.items() if key.endswith("_step_ratio") and "local" in key})
    return summary


def step_ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """What the step alone adds above the floor with the model resident, and backprop's multiple of it."""
    modes = present_modes(runs)
    added = {mode: runs[mode]["step_peak_mb"] - runs[mode]["rss_model_resident_mb"] for mode in modes}
    return {
        **{f"{mode_key(mode)}_step_mb": round(added[mode], 1) for mode in modes},
        **{
            f"{mode_key(mode)}_step_ratio": round(added["backprop"] / max(added[mode], 1.0), 1)
            for mode in modes
            if mode != "backprop"
        },
    }


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(document["models"])
    widest = max(len(present_modes(document["models"][m]["runs"])) for m in models)
    fig, axes = plt.subplots(1, len(models), figsize=(max(5.5, 2.0 * widest) * len(models), 5), squeeze=False)
    colors = {
        "backprop": "#c44e52",
        "fd": "#4c72b0",
        "jvp": "#55a868",
        "fd-local": "#8172b2",
        "fd-local-pool": "#ccb974",
    }
    for ax, model in zip(axes[0], models, strict=True):
        entry = document["models"][model]
        runs = entry["runs"]
        shown = present_modes(runs)  # older reports hold only backprop, fd and jvp
        ratios = summarize(model, runs)  # recomputed: older reports' summaries lack the local modes
        xs = list(range(len(shown)))
        peaks = [runs[m]["peak_mb"] for m in shown]
        ax.bar(xs, peaks, color=[colors[m] for m in shown], alpha=0.35, label="whole-process peak (median)")
        ax.errorbar(
            xs,
            peaks,
            yerr=[[p - runs[m]["peak_min_mb"] for m, p in zip(shown, peaks, strict=True)],
                  [runs[m]["peak_max_mb"] - p for m, p in zip(shown, peaks, strict=True)]],
            fmt="none",
            ecolor="black",
            capsize=4,
            lw=0.8,
        )  # fmt: skip
        resident = [runs[m]["rss_model_resident_mb"] for m in shown]
        ax.bar(xs, resident, color=[colors[m] for m in shown], alpha=0.9, label="RSS with the model resident")
        imports = [runs[m]["rss_after_imports_mb"] for m in shown]
        ax.bar(xs, imports, color="#555555", alpha=0.9, width=0.5, label="RSS after imports")
        for x, mode, peak in zip(xs, shown, peaks, strict=True):
            label = f"{peak:.0f} MB"
            if mode != "backprop":
                label += f"\n{ratios[f'{mode_key(mode)}_ratio']:.2f}x less"
                label += f"\n(step alone {step_ratios(runs)[f'{mode_key(mode)}_step_ratio']:.0f}x)"
            ax.text(x, runs[mode]["peak_max_mb"], label, ha="center", va="bottom", fontsize=9)
        ax.axhline(runs["backprop"]["peak_mb"] / 5, color="black", lw=0.8, ls="--", label="backprop peak / 5")
        ax.set_xticks(xs, list(shown))
        ax.set_ylabel("resident memory (MB)")
        ax.set_ylim(0, max(runs[m]["peak_max_mb"] for m in shown) * 1.22)
        shape = runs["backprop"]["batch_shape"]
        ax.set_title(f"{model}: one step, batch {shape[0]} x {shape[1]} tokens", fontsize=10)
        ax.legend(fontsize=7.5, loc="upper right")
    repeats = document.get("repeat", 1)
    fig.suptitle(
        f"Peak RSS of one training step, each in a fresh process (float32, torch {document['machine']['torch']}, "
        f"median of {repeats}, bars: min-max)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_batches(documents: list[dict[str, Any]], path: Path) -> None:
    """Peak and ratio against the batch size, one report per batch (same model and tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(
        (doc["batch"], model, entry["runs"], entry["summary"])
        for doc in documents
        for model, entry in doc["models"].items()
    )
    models = sorted({model for _, model, _, _ in points})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in models:
        rows = [(b, runs, summary) for b, m, runs, summary in points if m == model]
        batches = [b for b, _, _ in rows]
        for mode, marker in (("backprop", "s"), ("fd", "o"), ("jvp", "^")):
            axes[0].plot(batches, [r[mode]["peak_mb"] for _, r, _ in rows], marker=marker, label=f"{model} {mode}")
        for mode, marker in (("fd", "o"), ("jvp", "^")):
            axes[1].plot(batches, [s[f"{mode}_ratio"] for _, _, s in rows], marker=marker, label=f"{model} {mode}")
    axes[0].set(xlabel="batch (sequences)", ylabel="whole-process peak RSS (MB)", title="peak of one step")
    axes[1].axhline(5, color="black", lw=0.8, ls="--", label="5x")
    axes[1].set(xlabel="batch (sequences)", ylabel="backprop peak / forward peak", title="memory saved")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    tokens = {doc["tokens"] for doc in documents}
    fig.suptitle(f"One step at {'/'.join(map(str, sorted(tokens)))} tokens per sequence, each mode in a fresh process")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        **versions,
    }


def print_summaries(document: dict[str, Any]) -> None:
    # One line per model; SmolLM2's is the very last line.
    order = sorted(document["models"], key=lambda m: m == "smollm2-135m")
    for model in order:
        print(json.dumps(document["models"][model]["summary"]), flush=True)


DEFINITIONS = {
    "peak_mb": "whole-process peak RSS of the child: ru_maxrss of its rusage as os.wait4 returns it (interpreter, "
    "imports, tokenizer, data, model and one step); with --repeat N, the median run's (peaks_mb lists all); "
    "self_reported_peak_mb is the child's RUSAGE_SELF ru_maxrss just after the step",
    "rss_after_imports_mb": "RSS once torch, transformers, peft and the pwff modules are imported",
    "rss_after_data_mb": "... and the tokenizer and the client's examples are loaded",
    "rss_after_model_mb": "... and the PEFT model is built and its trainable state loaded (weights may still be "
    "mapped, not yet read)",
    "rss_model_resident_mb": "... and every weight has been read once: the floor of any step",
    "step_peak_mb": "peak RSS during the step alone (VmHWM reset just before it)",
    "ratio": "backprop peak_mb / forward-mode peak_mb",
    "step_ratio": "backprop's step_peak_mb above its rss_model_resident_mb / the mode's (step_alone)",
    "perturbed_dim": "forward modes: the number of perturbed parameters (fwd.perturb); fd-local-pool holds "
    "seed_pool x perturbed_dim directions in float32 plus a float64 copy (12 bytes each) during the step",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--models", default="smollm2-135m,minilm-l6", help="comma-separated model names")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per (model, mode); median reported")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="memory", help="report name: OUT/NAME.json and OUT/NAME.png")
    parser.add_argument("--from-json", type=Path, default=None, help="run nothing: redraw the figure from this file")
    parser.add_argument(
        "--batches-from",
        default="",
        help="run nothing: comma-separated reports of different --batch, drawn as OUT/NAME.png against the batch",
    )
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated modes among {', '.join(ALL_MODES)} (backprop is always measured)",
    )
    parser.add_argument(
        "--seed-pool", type=int, default=DEFAULT_SEED_POOL, help="fd-local-pool: seeds in the pool (fwd.seed_pool)"
    )
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        model, mode = args.child
        result = child(model, mode, args.batch, args.tokens, args.seed_pool)
        print(CHILD_MARK + json.dumps(result), flush=True)
        return

    if args.batches_from:
        documents = [json.loads(Path(p).read_text()) for p in args.batches_from.split(",") if p]
        args.out.mkdir(parents=True, exist_ok=True)
        plot_batches(documents, args.out / f"{args.name}.png")
        for doc in documents:
            for entry in doc["models"].values():
                print(json.dumps({"batch": doc["batch"], **entry["summary"]}))
        return

    if args.from_json is not None:
        loaded = json.loads(args.from_json.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        plot(loaded, args.out / f"{args.name}.png")
        print_summaries(loaded)
        return

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in DATASETS]
    if unknown or not models:
        parser.error(f"unknown models: {unknown or args.models}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    chosen = {m.strip() for m in args.modes.split(",") if m.strip()} | {"backprop"}
    if chosen - set(ALL_MODES):
        parser.error(f"unknown modes: {sorted(chosen - set(ALL_MODES))}; known: {', '.join(ALL_MODES)}")
    modes = [mode for mode in ALL_MODES if mode in chosen]

    document: dict[str, Any] = {
        "created": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "batch": args.batch,
        "tokens": args.tokens,
        "repeat": args.repeat,
        "modes": modes,
        "seed_pool": args.seed_pool if "fd-local-pool" in modes else None,
        "definitions": DEFINITIONS,
        "models": {},
    }
    for model in models:
        repeats: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for index in range(args.repeat):
            for mode in modes:  # interleaved, so a busy spell of the machine hits every mode alike
                print(f"{model} {mode} ({index + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                run = run_child(model, mode, args.batch, args.tokens, args.seed_pool)
                repeats[mode].append(run)
                print(
                    f"  peak {run['peak_mb']:.0f} MB (imports {run['rss_after_imports_mb']:.0f}, model resident "
                    f"{run['rss_model_resident_mb']:.0f}, step peak {run['step_peak_mb']:.0f}) in {run['step_s']:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
        runs = {mode: combine(repeats[mode]) for mode in modes}
        document["models"][model] = {
            "spec": {mode: spec_fields(model, mode, args.batch, args.tokens, args.seed_pool) for mode in modes},
            "runs": runs,
            "summary": summarize(model, runs),
            "step_alone": step_ratios(runs),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(document, args.out / f"{args.name}.png")
    print_summaries(document)


if __name__ == "__main__":
    main()
