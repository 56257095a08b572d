"""Orchestration overhead of pwff: the quickstart job run distributed and embedded, round by round.

    .venv/bin/python bench/overhead.py                 # the spec's own rounds (6 for the quickstart)
    .venv/bin/python bench/overhead.py --rounds 2      # quicker
    .venv/bin/python bench/overhead.py --set local_steps=5 --set eval_max_examples=256

The same job spec runs twice, with the real MiniLM model, data, RabbitMQ and Redis:

- distributed: `tests.harness.ServiceCluster`, i.e. scheduler, aggregator and N workers
  (default 2) as separate `python -m services.<name>` processes over RabbitMQ and Redis, each
  worker limited to one torch thread (PWFF_TORCH_THREADS=1, set by ServiceCluster);
- embedded: `services.embedded.EmbeddedCluster`, the same classes as threads of this process
  on the in-process bus and store, with one worker (default) using torch's default threads.

What is measured, per round (see DEFINITIONS below, which are also written into the JSON):
the round's wall time (`duration_s`: scheduler clock, round opened -> commit seen), the
evaluation time (`eval_s`, aggregator), and every task's compute time. The round record only
keeps the slowest task (`compute_s_max`, see `_RoundAccumulator` in the aggregator); the
per-task figures come from the worker's "trained ... in X.XXs" log line, which carries the
same `compute_s` value (rounded to 10 ms) that the worker sends in its UpdateReady message.

Writes bench/results/overhead.json, overhead.png and overhead.md (`--out` names another folder);
the last line on stdout is a one-line JSON summary. On the tiny random model, in a minute or so:

    .venv/bin/python bench/overhead.py --rounds 1 --out /tmp/overhead --set model=tiny-bert \
        --set local_steps=2 --set eval_max_examples=32
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shared.spec import JobSpec, SpecError, load_spec_file
from shared.store import Keys, Store

if __package__ in (None, ""):  # run as a script: bench/ is on sys.path, the repository root (tests/) is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = REPO / "examples" / "quickstart.yaml"
DEFAULT_OUT = REPO / "bench" / "results"
FINAL_STATES = ("succeeded", "failed", "cancelled")

# The worker's log line after each task (services/worker/worker.py):
#   "%s trained %s round %d client %d: loss %.4f in %.2fs, %d bytes up" (newer workers add " wave %d")
TRAINED = re.compile(
    r"(?P<worker>\S+) trained (?P<job>\S+) round (?P<round>\d+) client (?P<client>\d+)(?: wave \d+)?: "
    r"loss (?P<loss>\S+) in (?P<compute>[0-9.]+)s, (?P<bytes>\d+) bytes up"
)
# ... and before it, once it has the task and the decoded global state: "%s starting %s round %d client %d"
# (newer workers add " wave %d (personal state: %s)")
STARTING = re.compile(
    r"(?P<worker>\S+) starting (?P<job>\S+) round (?P<round>\d+) client (?P<client>\d+)"
    r"(?: wave \d+)?(?: \(personal state: [^)]*\))?$"
)
# Both as the services format them: "%(asctime)s %(levelname)s %(name)s: %(message)s" (asctime to the ms).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STAMP = re.compile(r"^(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")

DEFINITIONS = {
    "wall_s": "round wall time: `duration_s` of the round record = committed_at - opened_at on the scheduler's "
    "clock (tasks published -> aggregator's RoundCommitted event handled). Includes dispatch, compute, uploads, "
    "merging, aggregation, evaluation, publishing the adapter archive and the commit.",
    "eval_s": "held-out evaluation of the new global model in the aggregator (record field `eval_s`). It is "
    "EXCLUDED from every overhead figure and reported separately: it is model work the job asked for, not "
    "orchestration.",
    "compute_s": "one task's compute as the worker times it (UpdateReady.compute_s): get the cached model, load "
    "the global state into it, local training, take the delta, encode/compress it. NOT included: reading and "
    "decoding the global state from the store, storing the update, announcing it. The first task of each worker "
    "also pays loading the base model (round 1).",
    "compute_s_max": "slowest task of the round (record field `compute_s_max`, the only per-task figure the "
    "aggregator keeps: `_RoundAccumulator` tracks the max, not the sum).",
    "compute_s_sum": "sum of all task compute times of the round, from the workers' 'trained ... in X.XXs' log "
    "lines (same value as compute_s, rounded to 10 ms; the round record has no sum).",
    "ideal_parallel_compute_s": "compute_s_sum / workers: the round's compute if it were spread perfectly evenly "
    "over the workers.",
    "critical_path_compute_s": "max over workers of that worker's summed task compute in the round: the compute "
    "the round had to wait for given how tasks were actually distributed.",
    "overhead_s": "orchestration overhead = wall_s - eval_s - ideal_parallel_compute_s. The headline figure. It "
    "splits into load_imbalance_s + orchestration_s.",
    "load_imbalance_s": "critical_path_compute_s - ideal_parallel_compute_s: time lost because the tasks (8 "
    "clients over 2 workers) did not split into equal compute per worker.",
    "orchestration_s": "wall_s - eval_s - critical_path_compute_s: time the busiest worker was not computing and "
    "no evaluation ran (queueing, store reads/writes, (de)serialization, the aggregator merging and committing, "
    "scheduler round-trips).",
    "overhead_vs_slowest_task_s": "wall_s - eval_s - compute_s_max. Only meaningful when each worker runs at most "
    "one task per round; here a worker runs several tasks sequentially, so this mostly counts other tasks' "
    "compute. Reported because the brief asked for it; do not read it as overhead.",
    "overhead_fraction": "sum of overhead_s / sum of wall_s over all rounds.",
    "timeline": "an approximate, additive split of orchestration_s from timestamps (log lines to the ms, "
    "and the round plan's opened_at/close_sent_at/committed_at in the store), followed on the worker that finished "
    "the round's last task: dispatch_s (round opened -> its first task started, i.e. task delivered and global "
    "state fetched and decoded), between_tasks_s (its gaps between one task's end and the next one's start: "
    "store the update, announce it, ack, receive the next task, fetch and decode the state), "
    "last_task_to_close_s (last task's end -> scheduler sends CloseRound: store + announce the last update, "
    "aggregator loads and merges it, UpdateMerged reaches the scheduler), commit_s (CloseRound sent -> commit "
    "seen by the scheduler, minus eval_s: apply the mean, build the adapter archive, atomic commit, event). "
    "residual_s is what these leave of orchestration_s (timestamp rounding, and the busiest worker not being the "
    "one that finished last).",
    "job_wall_s": "job created_at -> its final state (scheduler clock): includes the aggregator's round 0 "
    "(model load + initial evaluation) and every round. Excludes starting the services.",
}


# -- per-task compute from worker logs ------------------------------------------------------------


@dataclass(frozen=True)
class TaskTime:
    worker: str
    round: int
    client: int
    compute_s: float
    upload_bytes: int
    started_at: float | None = None
    finished_at: float | None = None


def _stamp(line: str) -> float | None:
    found = STAMP.match(line)
    if not found:
        return None
    return datetime.strptime(found["stamp"], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logging writes it


def parse_tasks(lines: list[str], job_id: str) -> list[TaskTime]:
    """Every finished task of `job_id` in worker log lines, with start and end times where the lines have them."""
    starts: dict[tuple[str, int, int], float | None] = {}
    tasks = []
    for line in lines:
        if found := STARTING.search(line):
            if found["job"] == job_id:
                starts[(found["worker"], int(found["round"]), int(found["client"]))] = _stamp(line)
        elif (found := TRAINED.search(line)) and found["job"] == job_id:
            worker, round_, client = found["worker"], int(found["round"]), int(found["client"])
            tasks.append(
                TaskTime(
                    worker,
                    round_,
                    client,
                    compute_s=float(found["compute"]),
                    upload_bytes=int(found["bytes"]),
                    started_at=starts.pop((worker, round_, client), None),
                    finished_at=_stamp(line),
                )
            )
    return tasks


class _Capture(logging.Handler):
    """Keeps the embedded worker's log messages (the same text the distributed workers write to their logs)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.lines: list[str] = []
        self._lines_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lines_lock:
            self.lines.append(self.format(record))


@contextmanager
def captured_worker_log() -> Iterator[_Capture]:
    logger = logging.getLogger("services.worker.worker")
    handler = _Capture()
    previous = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # keep the per-task INFO lines off the terminal
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]


# -- one run --------------------------------------------------------------------------------------


@dataclass
class ModeRun:
    mode: str
    workers: int
    job: dict[str, Any]
    tasks: list[TaskTime]
    plans: dict[int, dict[str, float]]
    startup_s: float
    harness_wall_s: float
    torch_threads: dict[str, Any]
    noise: dict[str, Any] = field(default_factory=dict)


class CpuWatch:
    """System-wide busy CPU seconds vs the seconds used by our own processes: how much else ran meanwhile."""

    def __init__(self) -> None:
        self.load_before = os.getloadavg()
        self.system_before = self._busy(psutil.cpu_times())
        self.self_before = self._own(psutil.Process())
        self.began = time.monotonic()

    @staticmethod
    def _busy(times: Any) -> float:
        return float(
            times.user
            + times.system
            + getattr(times, "nice", 0.0)
            + getattr(times, "irq", 0.0)
            + getattr(times, "softirq", 0.0)
        )

    @staticmethod
    def _own(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    def finish(self, service_pids: list[int]) -> dict[str, Any]:
        elapsed = time.monotonic() - self.began
        system = self._busy(psutil.cpu_times()) - self.system_before
        ours = self._own(psutil.Process()) - self.self_before
        for pid in service_pids:  # the service processes started with this mode
            with suppress(psutil.Error):
                ours += self._own(psutil.Process(pid))
        cores = psutil.cpu_count() or 1
        other = max(0.0, system - ours)
        return {
            "loadavg_before": [round(x, 2) for x in self.load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "elapsed_s": round(elapsed, 2),
            "cpu_capacity_s": round(elapsed * cores, 2),
            "cpu_busy_system_s": round(system, 2),
            "cpu_used_by_benchmark_s": round(ours, 2),
            "cpu_used_by_others_s": round(other, 2),
            "others_share_of_capacity": round(other / (elapsed * cores), 3) if elapsed > 0 else None,
        }


def read_plans(store: Store, namespace: str, job_id: str, rounds: int) -> dict[int, dict[str, float]]:
    """The scheduler's round plans: opened_at, close_sent_at, committed_at (its clock, time.time())."""
    keys = Keys(namespace)
    plans = {}
    for round_ in range(1, rounds + 1):
        plan = store.hash_get_all(keys.round_plan(job_id, round_))
        plans[round_] = {
            name: float(plan[name]) for name in ("opened_at", "close_sent_at", "committed_at") if plan.get(name)
        }
    return plans


def _poll(
    fetch: Callable[[], dict[str, Any]], on_update: Callable[[dict[str, Any]], None], timeout_s: float, poll_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = fetch()
        on_update(job)
        if job["state"] in FINAL_STATES:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job['id']} still {job['state']} after {timeout_s:g}s")
        time.sleep(poll_s)


def run_distributed(
    spec: JobSpec,
    workers: int,
    cache_dir: Path,
    timeout_s: float,
    on_update: Callable[[dict[str, Any]], None],
    keep_logs: Path | None,
) -> ModeRun:
    from shared.store.redis import RedisStore
    from tests.harness import ServiceCluster

    log_dir = Path(tempfile.mkdtemp(prefix="pwff-bench-logs-"))
    watch = CpuWatch()
    began = time.perf_counter()
    cluster = ServiceCluster(log_dir, cache_dir, workers=workers)
    startup_s = time.perf_counter() - began
    ok = False
    try:
        job_id = cluster.submit(spec.model_dump(mode="json"))
        with cluster.api() as client:

            def fetch() -> dict[str, Any]:
                response = client.get(f"/v1/jobs/{job_id}")
                response.raise_for_status()
                result: dict[str, Any] = response.json()
                return result

            job = _poll(fetch, on_update, timeout_s, poll_s=0.5)
        harness_wall_s = time.perf_counter() - began - startup_s
        lines: list[str] = []
        for log in cluster.worker_logs:
            lines.extend(log.read_text(errors="replace").splitlines())
        tasks = parse_tasks(lines, job_id)
        store = RedisStore(cluster.settings.redis_url)
        try:
            plans = read_plans(store, cluster.namespace, job_id, int(job["rounds"]))
        finally:
            store.close()
        pids = [p.pid for p in (cluster.scheduler, cluster.aggregator, *cluster.workers)]
        noise = watch.finish(pids)
        ok = job["state"] == "succeeded"
    finally:
        cluster.close()
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in log_dir.glob("*.log"):
                shutil.copy(log, keep_logs / log.name)
        if not ok:
            for log in sorted(log_dir.glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)
        shutil.rmtree(log_dir, ignore_errors=True)
    aggregator_threads = os.environ.get("PWFF_TORCH_THREADS") or "torch default"
    threads = {
        "worker_torch_threads": 1,
        "aggregator_torch_threads": aggregator_threads,
        "scheduler_torch_threads": "n/a (no tensors)",
        "note": "ServiceCluster sets PWFF_TORCH_THREADS=1 for every worker; the aggregator (evaluation) "
        "inherits the environment, so it uses torch's default thread count unless PWFF_TORCH_THREADS is set",
    }
    return ModeRun("distributed", workers, job, tasks, plans, startup_s, harness_wall_s, threads, noise)


def run_embedded(
    spec: JobSpec,
    workers: int,
    threads: int,
    cache_dir: Path,
    timeout_s: float,
    on_update: Callable[[dict[str, Any]], None],
) -> ModeRun:
    import torch
    import transformers

    from services.embedded import EmbeddedCluster

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would break the progress display

    previous_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    watch = CpuWatch()
    namespace = "pwff-bench"
    try:
        with captured_worker_log() as capture:
            began = time.perf_counter()
            with EmbeddedCluster(cache_dir, workers=workers, namespace=namespace) as cluster:
                startup_s = time.perf_counter() - began
                job_id = cluster.scheduler.submit(spec)
                job = _poll(lambda: cluster.scheduler.get_job(job_id), on_update, timeout_s, poll_s=0.2)
                harness_wall_s = time.perf_counter() - began - startup_s
                plans = read_plans(cluster.store, namespace, job_id, int(job["rounds"]))
            tasks = parse_tasks(list(capture.lines), job_id)
    finally:
        torch.set_num_threads(previous_threads)
    noise = watch.finish([])
    return ModeRun(
        "embedded",
        workers,
        job,
        tasks,
        plans,
        startup_s,
        harness_wall_s,
        {"torch_threads": used_threads, "note": "one process; the worker and the aggregator share torch's threads"},
        noise,
    )


# -- figures --------------------------------------------------------------------------------------


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _count(clients: Any) -> int:
    return len(clients) if isinstance(clients, list) else int(clients or 0)


def _timeline(tasks: list[TaskTime], plan: dict[str, float], eval_s: float, orchestration: float) -> dict[str, Any]:
    """Split orchestration_s along the worker that finished the round's last task (see DEFINITIONS)."""
    timed = [(t, t.started_at, t.finished_at) for t in tasks if t.started_at is not None and t.finished_at is not None]
    if not timed or len(timed) != len(tasks) or not {"opened_at", "close_sent_at", "committed_at"} <= set(plan):
        return {}
    last = max(timed, key=lambda item: item[2])
    mine = sorted((item for item in timed if item[0].worker == last[0].worker), key=lambda item: item[1])
    dispatch = mine[0][1] - plan["opened_at"]
    between = sum(b[1] - a[2] for a, b in itertools.pairwise(mine))
    to_close = plan["close_sent_at"] - last[2]
    commit = plan["committed_at"] - plan["close_sent_at"] - eval_s
    return {
        "worker": last[0].worker,
        "dispatch_s": _r(dispatch),
        "between_tasks_s": _r(between),
        "last_task_to_close_s": _r(to_close),
        "commit_s": _r(commit),
        "residual_s": _r(orchestration - (dispatch + between + to_close + commit)),
    }


def round_rows(run: ModeRun) -> list[dict[str, Any]]:
    by_round: dict[int, list[TaskTime]] = defaultdict(list)
    for task in run.tasks:
        by_round[task.round].append(task)
    rows = []
    for record in run.job["metrics"]:
        round_ = int(record["round"])
        if round_ == 0:
            continue  # initial evaluation: no tasks, no duration_s
        tasks = by_round.get(round_, [])
        per_worker: dict[str, float] = defaultdict(float)
        for task in tasks:
            per_worker[task.worker] += task.compute_s
        wall = float(record.get("duration_s", float("nan")))
        eval_s = float(record.get("eval_s", 0.0))
        compute_sum = sum(t.compute_s for t in tasks)
        ideal = compute_sum / run.workers
        critical = max(per_worker.values(), default=0.0)
        compute_max = float(record.get("compute_s_max", 0.0))
        timeline = _timeline(tasks, run.plans.get(round_, {}), eval_s, wall - eval_s - critical)
        rows.append(
            {
                "round": round_,
                # get_job spreads the metrics over the record, so `clients` is the metrics' count (a float),
                # not the record's list of client ids.
                "clients": _count(record.get("clients")),
                "tasks_logged": len(tasks),
                "tasks_per_worker": {w: sum(1 for t in tasks if t.worker == w) for w in sorted(per_worker)},
                "wall_s": _r(wall),
                "eval_s": _r(eval_s),
                "aggregate_s": _r(float(record.get("aggregate_s", 0.0)), 4),
                "compute_s_max": _r(compute_max),
                "compute_s_max_from_logs": _r(max((t.compute_s for t in tasks), default=0.0)),
                "compute_s_sum": _r(compute_sum),
                "compute_s_per_task": [t.compute_s for t in sorted(tasks, key=lambda t: t.client)],
                "ideal_parallel_compute_s": _r(ideal),
                "critical_path_compute_s": _r(critical),
                "overhead_s": _r(wall - eval_s - ideal),
                "load_imbalance_s": _r(critical - ideal),
                "orchestration_s": _r(wall - eval_s - critical),
                "overhead_vs_slowest_task_s": _r(wall - eval_s - compute_max),
                "timeline": timeline,
                "bytes_up": record.get("bytes_up"),
                "bytes_down": record.get("bytes_down"),
                "accuracy": record.get("accuracy"),
                "loss": record.get("loss"),
                "train_loss": record.get("train_loss"),
            }
        )
    return rows


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [float(row[key]) for row in rows if row.get(key) is not None]
    return round(statistics.fmean(values), 3) if values else None


def mode_summary(run: ModeRun, rows: list[dict[str, Any]]) -> dict[str, Any]:
    job = run.job
    wall_sum = sum(float(r["wall_s"]) for r in rows)
    overhead_sum = sum(float(r["overhead_s"]) for r in rows)
    steady = [r for r in rows if r["round"] > 1]
    initial: dict[str, Any] = next((m for m in job["metrics"] if m["round"] == 0), {})
    return {
        "state": job["state"],
        "workers": run.workers,
        "rounds": len(rows),
        "wall_s_per_round": _mean(rows, "wall_s"),
        "ideal_parallel_compute_s_per_round": _mean(rows, "ideal_parallel_compute_s"),
        "compute_s_sum_per_round": _mean(rows, "compute_s_sum"),
        "eval_s_per_round": _mean(rows, "eval_s"),
        "overhead_s_per_round": _mean(rows, "overhead_s"),
        "load_imbalance_s_per_round": _mean(rows, "load_imbalance_s"),
        "orchestration_s_per_round": _mean(rows, "orchestration_s"),
        "aggregate_s_per_round": _mean(rows, "aggregate_s"),
        "overhead_fraction": round(overhead_sum / wall_sum, 4) if wall_sum > 0 else None,
        "steady_rounds_from_2": {
            "wall_s_per_round": _mean(steady, "wall_s"),
            "overhead_s_per_round": _mean(steady, "overhead_s"),
            "orchestration_s_per_round": _mean(steady, "orchestration_s"),
        },
        "timeline_s_per_round": {
            key: _mean([r["timeline"] for r in rows if r["timeline"]], key)
            for key in ("dispatch_s", "between_tasks_s", "last_task_to_close_s", "commit_s", "residual_s")
        },
        "initial_eval_s": _r(initial.get("eval_s")),
        "job_wall_s": round(float(job["updated_at"]) - float(job["created_at"]), 2),
        "service_startup_s": round(run.startup_s, 2),
        "harness_wall_s": round(run.harness_wall_s, 2),
        "final_accuracy": job["metrics"][-1]["accuracy"] if job["metrics"] else None,
        "final_loss": job["metrics"][-1]["loss"] if job["metrics"] else None,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Top: each round's wall time split into compute, imbalance, evaluation, orchestration. Bottom: the overhead
    alone, split along the timeline (see DEFINITIONS["timeline"])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("distributed", "embedded") if m in results]
    fig, axes = plt.subplots(
        2, len(modes), figsize=(6 * len(modes), 8), sharey="row", squeeze=False, height_ratios=(3, 2)
    )
    parts = [
        ("ideal_parallel_compute_s", "compute (sum / workers)", "#4C72B0"),
        ("load_imbalance_s", "load imbalance", "#A6C8E8"),
        ("eval_s", "evaluation (not overhead)", "#55A868"),
        ("orchestration_s", "orchestration", "#C44E52"),
    ]
    timeline_parts = [
        ("load_imbalance_s", "load imbalance", "#A6C8E8"),
        ("dispatch_s", "round opened -> first task starts", "#8172B3"),
        ("between_tasks_s", "between a worker's tasks", "#C44E52"),
        ("last_task_to_close_s", "last task -> CloseRound sent", "#DD8452"),
        ("commit_s", "CloseRound -> commit (minus eval)", "#937860"),
        ("residual_s", "residual", "#BBBBBB"),
    ]
    for column, mode in enumerate(modes):
        rows = results[mode]["rounds"]
        xs = [r["round"] for r in rows]
        summary = results[mode]["summary"]
        axis = axes[0][column]
        bottom = [0.0] * len(rows)
        for key, label, colour in parts:
            heights = [max(0.0, float(r[key])) for r in rows]
            axis.bar(xs, heights, bottom=bottom, label=label, color=colour, width=0.7)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axis.plot(xs, [r["wall_s"] for r in rows], "k_", markersize=22, mew=2, label="round wall time")
        axis.set_title(
            f"{mode} ({summary['workers']} worker{'s' if summary['workers'] > 1 else ''}): "
            f"overhead {summary['overhead_s_per_round']:.2f}s/round ({100 * summary['overhead_fraction']:.1f}%)"
        )
        axis.set_xticks(xs)
        axis = axes[1][column]
        bottom = [0.0] * len(rows)
        for key, label, colour in timeline_parts:
            heights = [
                max(0.0, float((r if key == "load_imbalance_s" else r.get("timeline") or {}).get(key) or 0.0))
                for r in rows
            ]
            axis.bar(xs, heights, bottom=bottom, label=label, color=colour, width=0.7)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axis.plot(xs, [r["overhead_s"] for r in rows], "k_", markersize=22, mew=2, label="overhead")
        axis.set_title(f"{mode}: the overhead alone")
        axis.set_xlabel("round")
        axis.set_xticks(xs)
    for row in axes:
        top = max(max(bar.get_y() + bar.get_height() for bar in axis.patches) for axis in row)
        row[0].set_ylim(0, top * 1.45)  # room for the legend above the bars
    axes[0][0].set_ylabel("seconds per round")
    axes[1][0].set_ylabel("overhead seconds")
    axes[0][-1].legend(loc="upper right", fontsize=8)
    axes[1][-1].legend(loc="upper right", fontsize=7)
    fig.suptitle(
        "pwff quickstart: where a round's wall time goes\n"
        "overhead = wall - eval - sum(compute)/workers (evaluation excluded; negative parts clipped)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict[str, Any], spec: JobSpec, machine: dict[str, Any]) -> str:
    lines = [
        f"Quickstart ({spec.model} on {spec.dataset}, {spec.num_clients} clients, {spec.rounds} rounds of "
        f"{spec.local_steps} local steps) on {machine['cpu_count']} CPU cores, torch {machine['torch']}.",
        "",
        "| mode | workers | wall s/round | compute s/round (sum/workers) | eval s/round | overhead s/round "
        "| of which load imbalance | overhead share | job wall s | final accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("distributed", "embedded"):
        if mode not in results:
            continue
        s = results[mode]["summary"]
        lines.append(
            f"| {mode} | {s['workers']} | {s['wall_s_per_round']:.1f} | {s['ideal_parallel_compute_s_per_round']:.1f} "
            f"| {s['eval_s_per_round']:.1f} | {s['overhead_s_per_round']:.1f} | {s['load_imbalance_s_per_round']:.1f} "
            f"| {100 * s['overhead_fraction']:.0f}% | {s['job_wall_s']:.0f} | {s['final_accuracy']:.4f} |"
        )
    lines += [
        "",
        "Overhead per round, split along the round's timeline (seconds; see `definitions.timeline` in overhead.json):",
        "",
        "| mode | load imbalance | opened -> first task | between a worker's tasks | last task -> CloseRound "
        "| CloseRound -> commit (minus eval) | residual |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("distributed", "embedded"):
        if mode not in results:
            continue
        s = results[mode]["summary"]
        t = s.get("timeline_s_per_round") or {}
        cells = [t.get(k) for k in ("dispatch_s", "between_tasks_s", "last_task_to_close_s", "commit_s", "residual_s")]
        lines.append(
            f"| {mode} | {s['load_imbalance_s_per_round']:.2f} | "
            + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
            + " |"
        )
    lines += [
        "",
        "Overhead = round wall time - evaluation - (sum of task compute / workers); evaluation is excluded "
        "from overhead and reported on its own. Overhead splits into load imbalance (busiest worker's compute "
        "minus the even share) and orchestration (everything else: queueing, store I/O, (de)serialization, "
        "merging, commit). Task compute comes from the workers' own timers; the round record keeps only the "
        "slowest task, so the sum is read from the workers' log lines. Timings come from a shared 2-core "
        "machine and are noisy (see `noise` in overhead.json).",
    ]
    return "\n".join(lines) + "\n"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def machine_info() -> dict[str, Any]:
    import torch

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "", False
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "PWFF_TORCH_THREADS_env": os.environ.get("PWFF_TORCH_THREADS"),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# -- CLI ------------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0] if __doc__ else None)


@app.command()
def main(
    spec_path: Annotated[Path, typer.Option("--spec", help="job spec (YAML)")] = DEFAULT_SPEC,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a spec field: key=value")] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", help="shortcut for --set rounds=N")] = None,
    workers: Annotated[int, typer.Option(help="workers in distributed mode")] = 2,
    embedded_workers: Annotated[int, typer.Option(help="workers in embedded mode")] = 1,
    embedded_threads: Annotated[int, typer.Option(help="torch threads in embedded mode (0: torch default)")] = 0,
    modes: Annotated[str, typer.Option(help="comma-separated: distributed,embedded")] = "distributed,embedded",
    out: Annotated[Path, typer.Option(help="results folder")] = DEFAULT_OUT,
    timeout: Annotated[float, typer.Option(help="seconds allowed per job")] = 3600,
    keep_logs: Annotated[Path | None, typer.Option(help="copy the distributed services' logs here")] = None,
    from_json: Annotated[
        Path | None, typer.Option(help="run nothing: redraw the figure and the table from this overhead.json")
    ] = None,
) -> None:
    """Run the job distributed and embedded; write overhead.json/.png/.md; print a JSON summary last."""
    console = Console(stderr=True)
    if from_json is not None:
        document = json.loads(from_json.read_text())
        loaded = {mode: document[mode] for mode in ("distributed", "embedded") if mode in document}
        out.mkdir(parents=True, exist_ok=True)
        plot(loaded, out / "overhead.png")
        text = markdown(loaded, JobSpec.model_validate(document["spec"]), document["machine"])
        (out / "overhead.md").write_text(text)
        console.print(text, soft_wrap=True, markup=False, highlight=False)
        print(json.dumps(_summary_line(loaded), separators=(",", ":")), flush=True)
        return
    overrides = list(set_ or [])
    if rounds is not None:
        overrides.append(f"rounds={rounds}")
    try:
        spec = load_spec_file(str(spec_path), overrides)
    except SpecError as error:
        console.print(f"[red]invalid spec:[/red] {error}")
        raise typer.Exit(2) from None
    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = set(wanted) - {"distributed", "embedded"}
    if unknown or not wanted:
        console.print(f"[red]unknown modes:[/red] {sorted(unknown) or modes}")
        raise typer.Exit(2)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shared.settings import Settings

    cache_dir = Settings().cache_dir
    machine = machine_info()
    results: dict[str, Any] = {}
    runs: dict[str, ModeRun] = {}
    progress = Progress(
        TextColumn("[bold]{task.description:<11}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        for mode in wanted:
            bar = progress.add_task(mode, total=spec.rounds, status="starting services")

            def on_update(job: dict[str, Any], bar: Any = bar) -> None:
                done = [m for m in job["metrics"] if m["round"] > 0]
                status = job["state"]
                if job["metrics"]:
                    last = job["metrics"][-1]
                    status = f"{job['state']} round {last['round']}: acc {last['accuracy']:.3f}"
                    if "duration_s" in last:
                        status += f", {last['duration_s']:.1f}s"
                progress.update(bar, completed=len(done), status=status)

            if mode == "distributed":
                run = run_distributed(spec, workers, cache_dir, timeout, on_update, keep_logs)
            else:
                run = run_embedded(spec, embedded_workers, embedded_threads, cache_dir, timeout, on_update)
            runs[mode] = run
            if run.job["state"] != "succeeded":
                console.print(f"[red]{mode} job {run.job['id']} {run.job['state']}:[/red] {run.job.get('error')}")
                raise typer.Exit(1)
            rows = round_rows(run)
            results[mode] = {
                "job_id": run.job["id"],
                "summary": mode_summary(run, rows),
                "rounds": rows,
                "initial_metrics": next((m for m in run.job["metrics"] if m["round"] == 0), None),
                "torch_threads": run.torch_threads,
                "noise": run.noise,
            }
            missing = [r["round"] for r in rows if r["tasks_logged"] != r["clients"]]
            if missing:
                console.print(f"[yellow]{mode}: task log lines do not match the clients in rounds {missing}[/yellow]")

    notes = [
        "Evaluation (eval_s) is excluded from overhead and reported separately.",
        "Per-task compute is not in the round record (the aggregator's _RoundAccumulator keeps only "
        "compute_s_max); compute_s_sum is read from the workers' 'trained ... in X.XXs' log lines, the same "
        "compute_s value the worker reports, rounded to 10 ms.",
        "Worker compute_s excludes fetching/decoding the global state and storing/announcing the update; "
        "those count as orchestration. Round 1 compute includes each worker loading the base model.",
        "Distributed workers use 1 torch thread each on a machine with "
        f"{machine['cpu_count']} cores; the embedded worker uses {runs['embedded'].torch_threads['torch_threads']} "
        "threads, so per-task compute differs between modes."
        if "embedded" in runs
        else "Distributed workers use 1 torch thread each.",
        "The machine is shared (other sessions run tests); see each mode's `noise` (load average and CPU seconds "
        "used by other processes during the run). Timings are single runs, not averages.",
    ]
    if len(results) == 2:
        d, e = results["distributed"]["summary"], results["embedded"]["summary"]
        comparison = {
            "job_wall_speedup_distributed_vs_embedded": round(e["job_wall_s"] / d["job_wall_s"], 3),
            "same_final_accuracy": d["final_accuracy"] == e["final_accuracy"],
        }
    else:
        comparison = {}
    document = {
        "benchmark": "pwff orchestration overhead: quickstart distributed vs embedded",
        "created_unix": time.time(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "spec_path": _relative(spec_path),
        "overrides": overrides,
        "spec": spec.model_dump(mode="json"),
        "machine": machine,
        "definitions": DEFINITIONS,
        "notes": notes,
        "comparison": comparison,
        **results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(results, out / "overhead.png")
    text = markdown(results, spec, machine)
    (out / "overhead.md").write_text(text)
    console.print(text, soft_wrap=True, markup=False, highlight=False)
    console.print(f"wrote {out / 'overhead.json'}, {out / 'overhead.png'}, {out / 'overhead.md'}")

    print(json.dumps(_summary_line(results), separators=(",", ":")), flush=True)


def _summary_line(results: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "wall_s_per_round",
        "ideal_parallel_compute_s_per_round",
        "eval_s_per_round",
        "overhead_s_per_round",
        "orchestration_s_per_round",
        "overhead_fraction",
        "job_wall_s",
        "final_accuracy",
    )
    return {mode: {k: results[mode]["summary"][k] for k in keys} for mode in results}


if __name__ == "__main__":
    app()
