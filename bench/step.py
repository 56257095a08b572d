"""Worker efficiency: a pwff task's time per local step against a bare torch loop, the first evaluation
against later ones, and two workers on this machine against one embedded worker.

    OMP_NUM_THREADS=2 .venv/bin/python bench/step.py                  # all three parts
    OMP_NUM_THREADS=2 .venv/bin/python bench/step.py --parts step     # only the step comparison
    .venv/bin/python bench/step.py --parts threads --placements pinned,quota --thread-rounds 2
    .venv/bin/python bench/step.py --parts step,eval --set model=tiny-bert   # `--set`: quickstart overrides

Parts (run in this order, each saved to bench/results/step.json as soon as it is done):

- step: the quickstart job's model, batch, sequence length and LoRA (MiniLM-L6, 16 x 64 tokens, LoRA
  r=8 on query/value + the classifier head, AdamW) trained by a bare loop — transformers + peft + torch,
  batches tokenized before the clock starts, nothing else — and by pwff worker tasks: the quickstart
  job (`--rounds` rounds) on the real Scheduler, Aggregator and Worker over the in-process bus and
  store, pumped by hand so that right after each training task the bare loop runs the same number of
  steps (the machine is shared: back-to-back pairs see the same conditions). Same process, same torch
  threads. pwff's figure is the worker's own task time (UpdateReady.compute_s: get the model, load
  the state, train, take the delta, encode it, store client-side state) per local step; the ratio is
  the median over the pairs of rounds 2 and later (round 1 also loads the model and tokenizes).
- eval: the same job's evaluation times (`eval_s` of every round record): round 0 (at job
  initialization, right after the model is loaded and warmed), round 1 and later rounds.
- threads: per-task compute (compute_s_sum / updates, rounds 2 and later: each worker process loads the
  model and tokenizes in its first tasks) of the quickstart job (`--thread-rounds` rounds, fewer held-out
  examples) embedded with one worker using the threads this process may use, against two
  `python -m services.worker` processes on this machine started as a user would, with no thread setting:
  `pinned` to one CPU each with taskset, in a cgroup with a one-CPU `quota` each (what the Helm chart's CPU
  limit gives a pod), and `unpinned` (each sees every CPU: the oversubscribed setup the issue measured). The
  workers size their threads themselves (shared.settings.available_cpus). Also embedded at one thread, and
  the `floor`: bare-loop processes (no pwff at all) timed over the same window, one on every CPU alone
  against two single-thread ones at once on one CPU each, which is the best ratio two workers sharing these
  CPUs can reach against one worker that has them all.

`--set key=value` (repeatable) overrides fields of examples/quickstart.yaml for every part, the bare loop
included (its model, data, batch, length and LoRA rank come from the spec); the tests run the parts on the
tiny model this way.

Writes bench/results/step.json and step.png (or `--out DIR`, `--name NAME`); the last line on stdout is a
one-line JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root (tests/) is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.reports import add_overrides_option, write_report
from shared.allocator import set_mmap_threshold
from shared.settings import Settings, available_cpus
from shared.spec import JobSpec, load_spec_file
from tests.harness import drain

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
QUICKSTART = REPO / "examples" / "quickstart.yaml"


# -- the bare loop ---------------------------------------------------------------------------------


class BareLoop:
    """The same model, batch, length and LoRA, trained by plain transformers + peft + torch, batches
    tokenized before any clock starts."""

    def __init__(self, spec: JobSpec) -> None:
        from peft import LoraConfig, get_peft_model

        from shared import data
        from shared.catalog import dataset_info
        from shared.models import load_base_model, load_tokenizer

        cache_dir = Settings().cache_dir
        torch.manual_seed(0)
        base = load_base_model(spec.model, dataset_info(spec.dataset).num_labels, cache_dir)
        for param in base.parameters():
            param.requires_grad_(False)
        self.model = get_peft_model(
            base,
            LoraConfig(
                r=spec.lora.r,
                lora_alpha=spec.lora.alpha,
                target_modules=["query", "value"],
                modules_to_save=["classifier"],
                task_type="SEQ_CLS",
            ),
        )
        tokenizer = load_tokenizer(spec.model, cache_dir)
        examples = data.client_examples(spec, 0)
        self.batches = []
        for start in range(0, len(examples) - spec.batch_size + 1, spec.batch_size):
            chunk = examples[start : start + spec.batch_size]
            encoded = tokenizer(
                [e.text for e in chunk],
                truncation=True,
                max_length=spec.max_length,
                padding="longest",
                return_tensors="pt",
            )
            self.batches.append({**encoded, "labels": torch.tensor([e.label for e in chunk])})
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=spec.optimizer.lr, weight_decay=0.0
        )
        self.model.train()
        self.done = 0
        self.run(2)  # warm up

    def run(self, steps: int) -> float:
        """Seconds for `steps` optimizer steps."""
        began = time.perf_counter()
        for _ in range(steps):
            loss = self.model(**self.batches[self.done % len(self.batches)]).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.done += 1
        return time.perf_counter() - began


# -- the pwff job, embedded --------------------------------------------------------------------------


def embedded_job(spec: JobSpec, cache_dir: Path, workers: int = 1) -> dict[str, Any]:
    from services.embedded import EmbeddedCluster

    began = time.perf_counter()
    with EmbeddedCluster(cache_dir, workers=workers) as cluster:
        job = cluster.wait(cluster.scheduler.submit(spec))
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['state']}: {job.get('error')}")
    return {"metrics": job["metrics"], "wall_s": time.perf_counter() - began}


def interleaved_job(spec: JobSpec, cache_dir: Path, bare: BareLoop) -> dict[str, Any]:
    """The job on the real Scheduler, Aggregator and Worker over the in-process bus and store, pumped by
    hand: after every training task, the bare loop runs the same number of steps, so each pair of
    figures is measured back to back, under the same conditions."""
    from services.aggregator.aggregator import Aggregator
    from services.scheduler.core import Scheduler
    from services.worker.worker import Worker
    from shared.bus import Queues
    from shared.bus.memory import MemoryBus
    from shared.messages import TrainTask, UpdateReady, decode_aggregator, decode_task
    from shared.state import Repositories
    from shared.store.memory import MemoryStore

    bus, store = MemoryBus(), MemoryStore()
    queues, repositories = Queues(), Repositories(store)
    scheduler = Scheduler(bus, store)
    aggregator = Aggregator(bus, store, cache_dir=cache_dir)
    worker = Worker(bus, store, cache_dir=cache_dir)
    job_id = scheduler.submit(spec)
    pairs: list[dict[str, Any]] = []
    began = time.perf_counter()
    while scheduler.get_job(job_id)["state"] not in ("succeeded", "failed", "cancelled"):
        moved = False
        for body in drain(bus, queues.aggregate):
            aggregator.handle(body)
            moved = True
        for body in drain(bus, queues.events):
            scheduler.handle_event(body)
            moved = True
        for body in drain(bus, queues.tasks):
            moved = True
            task = decode_task(body)
            started = time.perf_counter()
            worker.handle(body)
            handle_s = time.perf_counter() - started
            if not isinstance(task, TrainTask):
                continue
            raw = repositories.tensors.announcement(job_id, task.round, task.client, task.wave)
            announce = decode_aggregator(raw or b"")
            assert isinstance(announce, UpdateReady)
            bare_s = bare.run(task.local_steps)
            pairs.append(
                {
                    "round": task.round,
                    "client": task.client,
                    "steps": task.local_steps,
                    "compute_s": announce.compute_s,
                    "handle_s": handle_s,
                    "bare_s": bare_s,
                }
            )
        if not moved:
            scheduler.tick()
            time.sleep(0.05)
    job = scheduler.get_job(job_id)
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['state']}: {job.get('error')}")
    return {"metrics": job["metrics"], "pairs": pairs, "wall_s": time.perf_counter() - began}


def _ratios(pairs: list[dict[str, Any]], key: str = "compute_s") -> dict[str, float]:
    if not pairs:
        return {}
    per = [p[key] / p["bare_s"] for p in pairs]
    return {
        "pwff_step_s": statistics.mean(p[key] / p["steps"] for p in pairs),
        "bare_step_s": statistics.mean(p["bare_s"] / p["steps"] for p in pairs),
        "median_ratio": statistics.median(per),
        "ratio_of_sums": sum(p[key] for p in pairs) / sum(p["bare_s"] for p in pairs),
        "min_ratio": min(per),
        "max_ratio": max(per),
    }


def part_step(spec: JobSpec, rounds: int, cache_dir: Path) -> dict[str, Any]:
    job_spec = spec.model_copy(update={"rounds": rounds})
    bare = BareLoop(spec)
    load_before = os.getloadavg()
    job = interleaved_job(job_spec, cache_dir, bare)
    steady = [p for p in job["pairs"] if p["round"] > 1]
    first = [p for p in job["pairs"] if p["round"] == 1]
    result = {
        "threads": torch.get_num_threads(),
        "steady": _ratios(steady),
        "steady_handle": _ratios(steady, "handle_s"),
        "round1": _ratios(first),
        "pairs": job["pairs"],
        "job_metrics": job["metrics"],
        "job_wall_s": job["wall_s"],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "note": "pairs: each training task (the worker's own compute_s; handle_s adds reading the task's "
        "state, storing and announcing its update) followed at once by the bare loop running the same "
        "number of steps. steady: rounds 2 and later (round 1's first task also loads the model and "
        "every task tokenizes its shard's first batches)",
    }
    s = result["steady"]
    print(
        f"steady: pwff {s['pwff_step_s']:.3f} s/step, bare {s['bare_step_s']:.3f} s/step, "
        f"median ratio {s['median_ratio']:.3f}, ratio of sums {s['ratio_of_sums']:.3f}",
        flush=True,
    )
    return result


def part_eval(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    evals = [m["eval_s"] for m in metrics]
    later = statistics.median(evals[2:]) if len(evals) > 2 else evals[-1]
    return {
        "eval_s_by_round": evals,
        "round0_eval_s": evals[0],
        "round1_eval_s": evals[1],
        "later_eval_s": later,
        "first_round_ratio": evals[1] / later,
        "round0_ratio": evals[0] / later,
    }


# -- two workers on this machine ---------------------------------------------------------------------

_CPU_CGROUP = Path("/sys/fs/cgroup/cpu")


def _quota_cgroup(name: str) -> Path | None:
    """A cgroup v1 CPU cgroup allowing one CPU (cfs quota = period), as a container's CPU limit of 1 sets
    it; None where this machine does not let us make one."""
    directory = _CPU_CGROUP / name
    try:
        directory.mkdir()
        (directory / "cpu.cfs_period_us").write_text("100000")
        (directory / "cpu.cfs_quota_us").write_text("100000")
    except OSError:
        _remove_cgroup(directory)
        return None
    return directory


def _remove_cgroup(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()  # cgroupfs: rmdir, never unlink the control files


def _placed(command: list[str], placement: str, index: int, cgroups: list[Path]) -> list[str]:
    """`command` as a user would start it: pinned to one CPU (taskset), in a one-CPU quota cgroup, or as is."""
    if placement == "pinned":
        cpus = sorted(os.sched_getaffinity(0))
        return ["taskset", "-c", str(cpus[index % len(cpus)]), *command]
    if placement == "quota":
        group = _quota_cgroup(f"pwff-step-{os.getpid()}-{index}")
        if group is None:
            raise RuntimeError(f"cannot make a CPU cgroup under {_CPU_CGROUP}")
        cgroups.append(group)
        return ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", *command]
    return command


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def distributed_job(spec: JobSpec, cache_dir: Path, placement: str) -> dict[str, Any]:
    """Scheduler and aggregator via tests.harness; two workers started here, with the environment a user's
    shell has (no PWFF_TORCH_THREADS): `placement` pinned (taskset, one CPU each), quota (a cgroup with a
    one-CPU quota each, what the Helm chart's CPU limit gives a pod) or unpinned (every CPU each)."""
    from tests.harness import ServiceCluster, free_port

    logs = Path(tempfile.mkdtemp(prefix="pwff-step-"))
    cluster = ServiceCluster(logs, cache_dir, workers=0)
    workers: list[subprocess.Popen[bytes]] = []
    cgroups: list[Path] = []
    try:
        env = {k: v for k, v in cluster.base_env.items() if k not in ("PWFF_TORCH_THREADS", "OMP_NUM_THREADS")}
        ports = []
        for index in range(2):  # both start at once; the job is submitted once both serve /metrics
            command = _placed([sys.executable, "-m", "services.worker"], placement, index, cgroups)
            handle = (logs / f"worker-{index}.log").open("ab")
            ports.append(free_port())
            workers.append(
                subprocess.Popen(
                    command, cwd=REPO, env={**env, "PWFF_METRICS_PORT": str(ports[-1])}, stdout=handle, stderr=handle
                )
            )
        deadline = time.monotonic() + 180
        for index, (port, worker) in enumerate(zip(ports, workers, strict=True)):
            while not cluster._metrics_up(port):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"worker {index} did not start; see {logs}")
                time.sleep(0.5)
        services = {"scheduler": cluster.scheduler, "aggregator": cluster.aggregator}
        services.update({f"worker-{i}": w for i, w in enumerate(workers)})
        cpu_before = {name: _cpu_s(p.pid) for name, p in services.items()}
        began = time.perf_counter()
        job = cluster.wait(cluster.submit(spec.model_dump(mode="json")), timeout_s=3000)
        # What each service process used during the job (the scheduler serves the API and is polled here).
        cpu_s = {name: round(_cpu_s(p.pid) - cpu_before[name], 2) for name, p in services.items()}
        if job["state"] != "succeeded":
            raise RuntimeError(f"job {job['state']}: {job.get('error')}")
        threads = []
        for index in range(2):
            text = (logs / f"worker-{index}.log").read_text(errors="replace")
            line = next((li for li in text.splitlines() if "intra-op threads" in li), "")
            threads.append(line.split("torch uses ")[-1])
        return {
            "metrics": job["metrics"],
            "wall_s": time.perf_counter() - began,
            "worker_threads": threads,
            "cpu_s_during_job": cpu_s,
        }
    finally:
        for process in workers:
            process.terminate()
        for process in workers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        cluster.close()
        for group in cgroups:
            _remove_cgroup(group)
        shutil.rmtree(logs, ignore_errors=True)


def per_task(metrics: list[dict[str, Any]], first_round: int = 1) -> float:
    """Mean task compute (the workers' own compute_s) over the rounds from `first_round` on."""
    rounds = [m for m in metrics if m["round"] >= first_round]
    return sum(m["compute_s_sum"] for m in rounds) / sum(m["updates"] for m in rounds)


def bare_child(threads: int, steps: int, overrides: list[str]) -> None:
    """`--bare-child`: build the bare loop on `threads` threads, say "ready", wait for "go" on stdin, time
    `steps` steps, print the seconds per step (a separate process, so that its threads are its own)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    bare = BareLoop(load_spec_file(str(QUICKSTART), overrides))
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps({"threads": torch.get_num_threads(), "step_s": bare.run(steps) / steps}), flush=True)


def bare_processes(configs: list[tuple[int, str | None]], steps: int, overrides: list[str]) -> list[float]:
    """Seconds per bare-loop step of processes started together, each (threads, CPU list for taskset or
    None), timed over the same window (every process is built and warm before any clock starts); each
    builds its loop from the quickstart spec with `overrides` (`--set`)."""
    procs = []
    for threads, cpus in configs:
        command = [sys.executable, str(Path(__file__).resolve()), "--bare-child", str(threads), "--steps", str(steps)]
        command += [part for item in overrides for part in ("--set", item)]
        if cpus is not None:
            command = ["taskset", "-c", cpus, *command]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PWFF_TORCH_THREADS")}
        procs.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    try:
        for proc in procs:
            assert proc.stdout is not None
            while (line := proc.stdout.readline()) and line.strip() != "ready":
                pass
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out = []
        for proc in procs:
            stdout, _ = proc.communicate(timeout=1800)
            out.append(json.loads(stdout.strip().splitlines()[-1])["step_s"])
        return out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def part_floor(steps: int, overrides: list[str], repeats: int = 3) -> dict[str, Any]:
    """What two workers sharing this machine's CPUs can reach at best, with the bare loop: one process on
    every CPU alone, one pinned single-thread process alone, and two pinned single-thread processes at once
    (one CPU each). Alternated `repeats` times; medians."""
    cpus = sorted(os.sched_getaffinity(0))
    every = len(cpus)
    runs: dict[str, list[float]] = {"alone_all_threads": [], "alone_1_thread": [], "two_at_once_1_thread": []}
    for _ in range(repeats):
        runs["alone_all_threads"] += bare_processes([(every, None)], steps, overrides)
        runs["alone_1_thread"] += bare_processes([(1, str(cpus[0]))], steps, overrides)
        runs["two_at_once_1_thread"].append(
            statistics.mean(bare_processes([(1, str(cpus[0])), (1, str(cpus[1 % every]))], steps, overrides))
        )
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "steps": steps,
        "cpus": every,
        "step_s": runs,
        "median_step_s": medians,
        "all_threads_speedup": medians["alone_1_thread"] / medians["alone_all_threads"],
        "two_at_once_slowdown": medians["two_at_once_1_thread"] / medians["alone_1_thread"],
        "floor": medians["two_at_once_1_thread"] / medians["alone_all_threads"],
        "note": "floor: a bare-loop step of each of two single-thread processes running at once, one CPU "
        "each, over a step of one process using every CPU alone: the best ratio two workers on this "
        "machine can have against one embedded worker, with no pwff in it at all",
    }


PLACEMENTS = ("pinned", "quota", "unpinned")


def part_threads(
    spec: JobSpec,
    rounds: int,
    cache_dir: Path,
    save: Any,
    placements: tuple[str, ...],
    floor_steps: int,
    overrides: list[str],
    floor_repeats: int = 3,
) -> dict[str, Any]:
    job_spec = spec.model_copy(update={"rounds": rounds, "eval_max_examples": 64})
    steady_from = 2 if rounds >= 2 else 1
    out: dict[str, Any] = {"spec_rounds": rounds, "steady_from_round": steady_from, "cpus_available": available_cpus()}
    default_threads = torch.get_num_threads()
    variants: list[tuple[str, Any]] = [("embedded", lambda: embedded_job(job_spec, cache_dir))]
    variants += [(f"two_workers_{p}", lambda p=p: distributed_job(job_spec, cache_dir, p)) for p in placements]
    variants.append(("embedded_1_thread", None))
    for name, run in variants:
        load_before = os.getloadavg()
        if run is None:
            torch.set_num_threads(1)
            try:
                result = embedded_job(job_spec, cache_dir)
            finally:
                torch.set_num_threads(default_threads)
            result["threads"] = 1
        else:
            try:
                result = run()
            except RuntimeError as error:  # e.g. no CPU cgroup can be made here
                out[name] = {"skipped": str(error)}
                print(f"{name}: skipped ({error})", flush=True)
                continue
            result.setdefault("threads", default_threads)
        result["per_task_compute_s"] = per_task(result["metrics"], steady_from)
        result["per_task_compute_s_all_rounds"] = per_task(result["metrics"])
        result["round_wall_s"] = [m.get("duration_s") for m in result["metrics"] if m["round"] > 0]
        # The machine is shared: the 1/5/15-minute load averages (runnable tasks) around each variant.
        result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()
        out[name] = result
        print(
            f"{name}: {result['per_task_compute_s']:.2f} s per task (rounds {steady_from}+), "
            f"{result['per_task_compute_s_all_rounds']:.2f} s over all rounds",
            flush=True,
        )
        save(out)
    out["floor"] = part_floor(floor_steps, overrides, floor_repeats)
    print(
        f"floor: {out['floor']['median_step_s']} s per bare step, floor ratio {out['floor']['floor']:.3f}", flush=True
    )
    base = out["embedded"]["per_task_compute_s"]
    for placement in placements:
        variant = out.get(f"two_workers_{placement}", {})
        if "per_task_compute_s" in variant:
            out[f"ratio_{placement}"] = variant["per_task_compute_s"] / base
            out[f"ratio_{placement}_all_rounds"] = (
                variant["per_task_compute_s_all_rounds"] / out["embedded"]["per_task_compute_s_all_rounds"]
            )
    if "per_task_compute_s" in out.get("two_workers_pinned", {}):
        out["ratio_pinned_same_threads"] = (
            out["two_workers_pinned"]["per_task_compute_s"] / out["embedded_1_thread"]["per_task_compute_s"]
        )
    return out


# -- report --------------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("step", "eval", "threads") if p in results]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        r = results[panel]
        if panel == "step":
            steady, first = r["steady"], r["round1"]
            names = ["bare loop", "pwff task\n(rounds 2+)", "pwff task\n(round 1)"]
            values = [steady["bare_step_s"], steady["pwff_step_s"], first["pwff_step_s"]]
            axis.bar(names, values, color=["tab:gray", "tab:blue", "tab:cyan"])
            axis.set_ylabel("seconds per local step")
            axis.set_title(f"Local step, {r['threads']} threads: pwff / bare = {steady['median_ratio']:.2f}")
        elif panel == "eval":
            values = r["eval_s_by_round"]
            axis.bar([f"r{i}" for i in range(len(values))], values, color="tab:orange")
            axis.set_ylabel("held-out evaluation, seconds")
            axis.set_title(f"Evaluation: round 1 / later = {r['first_round_ratio']:.2f}")
        else:
            names = [
                n
                for n in ("embedded", "embedded_1_thread", *(f"two_workers_{p}" for p in PLACEMENTS))
                if "per_task_compute_s" in r.get(n, {})
            ]
            values = [r[n]["per_task_compute_s"] for n in names]
            axis.bar([n.replace("_", "\n", 1) for n in names], values, color="tab:green")
            if "floor" in r:
                floor = r["floor"]["floor"] * r["embedded"]["per_task_compute_s"]
                axis.axhline(
                    floor, color="tab:red", linestyle="--", label=f"bare-loop floor ({r['floor']['floor']:.2f}x)"
                )
                axis.legend(fontsize=7)
            axis.set_yscale("log")
            axis.set_ylabel(f"compute per task, seconds (rounds {r.get('steady_from_round', 1)}+, log)")
            axis.set_title("Two workers on this machine vs embedded")
        axis.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if "step" in results:
        s = results["step"]["steady"]
        summary.update(bare_step_s=round(s["bare_step_s"], 4), pwff_step_s=round(s["pwff_step_s"], 4))
        summary["step_ratio"] = round(s["median_ratio"], 3)
        summary["step_ratio_of_sums"] = round(s["ratio_of_sums"], 3)
    if "eval" in results:
        summary["first_eval_ratio"] = round(results["eval"]["first_round_ratio"], 3)
        summary["round0_eval_ratio"] = round(results["eval"]["round0_ratio"], 3)
    if "threads" in results and "malloc_mmap_threshold" in results["threads"]:
        summary["threads_malloc_mmap_threshold"] = results["threads"]["malloc_mmap_threshold"]
    t = results.get("threads", {})
    for key in (*(f"ratio_{p}" for p in PLACEMENTS), "ratio_pinned_same_threads"):
        if key in t:
            summary[f"threads_{key}"] = round(t[key], 3)
    if "floor" in t:
        summary["threads_floor"] = round(t["floor"]["floor"], 3)
        summary["threads_all_threads_speedup"] = round(t["floor"]["all_threads_speedup"], 3)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="step,eval,threads", help="comma-separated: step, eval, threads")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the embedded job (step and eval parts)")
    parser.add_argument("--thread-rounds", type=int, default=2, help="rounds of each job in the threads part")
    parser.add_argument(
        "--placements", default=",".join(PLACEMENTS), help=f"two-worker setups of the threads part: {PLACEMENTS}"
    )
    parser.add_argument("--floor-steps", type=int, default=20, help="bare-loop steps per floor measurement")
    parser.add_argument(
        "--floor-repeats", type=int, default=3, help="floor measurements (each alternates its three setups); median"
    )
    parser.add_argument("--name", default="step", help="report name: OUT/NAME.json and .png")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default bench/results)")
    add_overrides_option(parser)
    parser.add_argument("--bare-child", type=int, default=None, metavar="THREADS", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_repeats < 1:
        parser.error("--floor-repeats must be at least 1")
    # The allocator setting every pwff service applies at start (configure_process): the embedded job,
    # the bare loop and the bare-loop children run under it too, so that no side is measured on another
    # allocator than the workers' (glibc's default, or PWFF_MALLOC_MMAP_THRESHOLD).
    mmap_threshold = Settings().malloc_mmap_threshold
    set_mmap_threshold(mmap_threshold)
    if args.bare_child is not None:
        bare_child(args.bare_child, args.steps, args.overrides)
        return
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    parts = set(args.parts.split(","))
    spec = load_spec_file(str(QUICKSTART), args.overrides)
    cache_dir = Settings().cache_dir
    path = args.out / f"{args.name}.json"
    previous = json.loads(path.read_text())["results"] if path.exists() else {}
    results: dict[str, Any] = {k: v for k, v in previous.items() if k not in parts}

    def save(partial: dict[str, Any] | None = None, key: str = "threads") -> None:
        current = {**results, **({key: partial} if partial is not None else {})}
        write_report(path, summarize(current), current, {"quickstart": spec.model_dump(mode="json")})

    if parts & {"step", "eval"}:
        results["step"] = part_step(spec, args.rounds, cache_dir)
        results["eval"] = part_eval(results["step"]["job_metrics"])
        save()
    if "threads" in parts:
        placements = tuple(p for p in args.placements.split(",") if p)
        results["threads"] = part_threads(
            spec, args.thread_rounds, cache_dir, save, placements, args.floor_steps, args.overrides, args.floor_repeats
        )
        results["threads"]["malloc_mmap_threshold"] = mmap_threshold
        save()
    plot(results, args.out / f"{args.name}.png")
    print(json.dumps(summarize(results)))


if __name__ == "__main__":
    main()
