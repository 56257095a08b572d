"""Soak: many simulated clients for many rounds over the real RabbitMQ and Redis, nothing lost or counted twice.

    flock /tmp/pwff-bench.lock .venv/bin/python bench/soak.py                      # 1,000 clients x 20 rounds
    flock /tmp/pwff-bench.lock .venv/bin/python bench/soak.py --clients 100 --rounds 3 --workers 2

The three services run as separate processes (`python -m services.<name>`, through
`tests.plugins.launch`, which registers the `synthetic` mode of tests/plugins/synthetic.py): a worker
process handles many clients, one task after another. Each task uploads a seeded random delta of
MiniLM-L6's LoRA r=8 + head (75,653 values, ~151 KB in float16) through the job's codec; every other
step is the real code (the scheduler's plans and deadlines, the worker's state handling and upload,
the aggregator's validation, FedAvg, the atomic commit, the per-round evaluation on 8 held-out
examples). Every client takes part in every round.

Checked, per round:
- exactly once: the round's record counts `clients` updates from exactly the planned clients, and the
  aggregator's counters show every update merged once (no duplicate, late or invalid update);
- the committed global state minus the previous one equals the mean of the deltas the clients were
  seeded to send, recomputed here (max |error| against float32 rounding; one update lost or counted
  twice moves it by ~1e-6, a hundred times that rounding);
- the aggregator's resident memory (VmRSS from /proc, sampled every 0.1 s): before the round's first
  merge and at its peak, against the memory holding every decoded update would take
  (clients x 302 KB): a streaming mean keeps the rise per round flat in the number of clients;
- overhead: wall time per round (nothing trains: the whole round is orchestration), and per update.

After the last round the job's final evaluation fans out to every client (the synthetic mode skips
the model there too, publishing each client's adapter) and the job must succeed.

`--set key=value` (repeatable, dotted keys) overrides fields of the soak's job, e.g. `--set model=tiny-bert`
(the tests run it so, at a few clients: the deltas then have the tiny model's shapes).

Writes bench/results/soak.json and soak.png (or `--out DIR`, `--name NAME`); the last line on stdout is a
one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
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
from tests.plugins.launch import register
from tests.plugins.synthetic import shared_shapes, synthetic_delta

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
FINAL = ("succeeded", "failed", "cancelled")


def soak_spec(clients: int, rounds: int, round_deadline_s: float = 3600) -> dict[str, Any]:
    return {
        "name": "soak",
        "model": "minilm-l6",
        "dataset": "bbc-news",
        "mode": "synthetic",
        "num_clients": clients,
        "clients_per_round": clients,
        "rounds": rounds,
        "local_steps": 1,
        # bbc-news has 1,781 training examples: one each is enough, the synthetic mode reads none.
        "partition": {"kind": "iid", "min_examples": 1},
        # Uniform weights: the expected mean is the plain mean of the seeded deltas.
        "aggregation": {"weighting": "uniform"},
        "eval_max_examples": 8,
        "round_deadline_s": round_deadline_s,
        "seed": 7,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """The aggregator's VmRSS every `interval_s`, each sample tagged with the round the bench last saw open."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.round = 0
        self.samples: list[tuple[float, int, int]] = []  # (time, round, rss bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.round, self.rss()))
            except (OSError, RuntimeError):
                return  # the process is gone
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Soak:
    clients: int
    rounds: int
    workers: int
    rounds_seen: dict[int, dict[str, Any]] = field(default_factory=dict)


def expected_mean(
    spec: JobSpec, shapes: dict[str, tuple[int, ...]], round_: int, clients: list[int]
) -> dict[str, torch.Tensor]:
    total = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
    for client in clients:
        for name, value in synthetic_delta(spec, shapes, round_, client).items():
            total[name] += value.double()
    return {name: value / len(clients) for name, value in total.items()}


def stalled_report(job: dict[str, Any], seen_at: dict[int, float], submitted: float, log_dir: Path) -> str:
    """Why a soak did not finish: where the job stood, when each round committed, each service's last log lines."""
    rounds = {round_: round(at - submitted, 1) for round_, at in sorted(seen_at.items())}
    lines = [
        f"soak job {job.get('id')} still {job.get('state')!r} after {time.monotonic() - submitted:.0f}s",
        f"rounds committed (s since submission): {rounds}",
        f"round in progress: {job.get('round')}; error: {job.get('error')}",
    ]
    for log in sorted(log_dir.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-15:]
        lines.append(f"--- {log.name} (last {len(tail)} lines)")
        lines.extend(tail)
    return "\n".join(lines)


def run_soak(
    clients: int,
    rounds: int,
    workers: int,
    log_dir: Path,
    timeout_s: float = 3600,
    round_deadline_s: float = 3600,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """One soak job on a fresh private-namespace cluster; returns per-round figures and the checks.

    A round still open at `round_deadline_s` fails the job (every client is needed), so an update
    that never arrives ends the soak then, with the scheduler's count of what did, and the logs.
    `overrides`: `key=value` items applied to the job (`--set`).
    """
    register()  # this process validates the spec and recomputes the deltas: it must know the mode too
    spec_data = apply_overrides(soak_spec(clients, rounds, round_deadline_s), overrides or [])
    spec = JobSpec.model_validate(spec_data)
    started = time.monotonic()
    cluster = ServiceCluster(log_dir, Settings().cache_dir, workers=workers, test_modes=True)
    store = RedisStore(cluster.settings.redis_url)
    repos = Repositories(store, cluster.namespace)
    sampler = RssSampler(cluster.aggregator.pid)
    try:
        startup_s = time.monotonic() - started
        submitted = time.monotonic()
        job_id = cluster.submit(spec_data)
        services = {
            "scheduler": [cluster.scheduler.pid],
            "aggregator": [cluster.aggregator.pid],
            "workers": [worker.pid for worker in cluster.workers],
        }
        cpu: dict[int, dict[str, float]] = {}
        states: dict[int, dict[str, torch.Tensor]] = {}
        seen_at: dict[int, float] = {}
        job: dict[str, Any] = {}
        with cluster.api() as api:
            while time.monotonic() - submitted < timeout_s:
                job = api.get(f"/v1/jobs/{job_id}").json()
                for entry in job["metrics"]:
                    round_ = int(entry["round"])
                    if round_ in seen_at:
                        continue
                    seen_at[round_] = time.monotonic()
                    if round_ in (0, rounds):  # CPU spent on the rounds: from round 0's commit to the last
                        cpu[round_] = {name: sum(cpu_seconds(p) for p in pids) for name, pids in services.items()}
                    sampler.round = round_ + 1  # merging of the next round starts now
                    # Committed states are pruned two rounds later: read each one as soon as it is there.
                    blob = repos.tensors.global_state(job_id, round_)
                    if blob is None:
                        raise RuntimeError(f"global state of round {round_} was pruned before the bench read it")
                    states[round_] = decode_tensors(blob)
                if job["state"] in FINAL:
                    break
                dead = {
                    name: process.returncode
                    for name, process in [("scheduler", cluster.scheduler), ("aggregator", cluster.aggregator)]
                    + [(f"worker-{i}", worker) for i, worker in enumerate(cluster.workers)]
                    if process.poll() is not None
                }
                if dead:  # nothing restarts services here: waiting on would only run out the clock
                    raise RuntimeError(f"services exited: {dead}\n" + stalled_report(job, seen_at, submitted, log_dir))
                time.sleep(0.25)
            else:
                raise TimeoutError(stalled_report(job, seen_at, submitted, log_dir))
        finished = time.monotonic()
        outcomes = {
            outcome: cluster.metric(
                cluster.aggregator_metrics_port, f'pwff_updates_received_total{{outcome="{outcome}"}}'
            )
            for outcome in ("merged", "duplicate", "late", "invalid")
        }
        tasks = {
            outcome: sum(
                cluster.metric(port, f'pwff_tasks_processed_total{{outcome="{outcome}"}}')
                for port in cluster.worker_metric_ports
            )
            for outcome in ("done", "duplicate", "stale", "failed", "evaluated")
        }
    finally:
        sampler.close()
        store.close()
        cluster.close()
    if job.get("state") != "succeeded":
        report = stalled_report(job, seen_at, submitted, log_dir)
        raise RuntimeError(f"soak job ended {job.get('state')!r}: {job.get('error')}\n{report}")

    shapes = shared_shapes(spec, states[0])
    update_bytes = 4 * sum(torch.Size(s).numel() for s in shapes.values())
    per_round: list[dict[str, Any]] = []
    for round_ in range(1, rounds + 1):
        record = next(entry for entry in job["metrics"] if entry["round"] == round_)
        expected = expected_mean(spec, shapes, round_, list(range(clients)))
        error = max(
            float((states[round_][name].double() - states[round_ - 1][name].double() - expected[name]).abs().max())
            for name in shapes
        )
        # One update of the round counted twice (or lost) moves the mean by delta_i / clients.
        one_update = min(
            float(value.abs().max()) / clients
            for value in synthetic_delta(spec, shapes, round_, 0).values()
            if value.numel() > 100
        )
        rss = [(t, r) for t, rnd, r in sampler.samples if rnd == round_]
        wall_s = seen_at[round_] - seen_at[round_ - 1]
        per_round.append(
            {
                "round": round_,
                "updates": int(record["updates"]),
                "num_clients": int(record["num_clients"]),
                "mean_error": error,
                "one_update_shift": one_update,
                "wall_s": wall_s,
                "s_per_update": wall_s / clients,
                "aggregate_s": float(record.get("aggregate_s", 0.0)),
                "eval_s": float(record.get("eval_s", 0.0)),
                "rss_start_mb": rss[0][1] / 2**20 if rss else None,
                "rss_peak_mb": max(r for _, r in rss) / 2**20 if rss else None,
                "rss_end_mb": rss[-1][1] / 2**20 if rss else None,
            }
        )
    expected_updates = clients * rounds
    merged_total = sum(r["updates"] for r in per_round)
    walls = [r["wall_s"] for r in per_round]
    steady = sorted(walls[1:] or walls)
    peaks = [r["rss_peak_mb"] for r in per_round if r["rss_peak_mb"] is not None]
    return {
        "clients": clients,
        "rounds": rounds,
        "workers": workers,
        "job_id": job_id,
        "startup_s": startup_s,
        "job_s": finished - submitted,
        "rounds_s": seen_at[rounds] - seen_at[0],
        "final_eval_s": finished - seen_at[rounds],
        "update_mb_decoded": update_bytes / 2**20,
        # CPU per merged update in each service over rounds 1..R (the machine's other load excluded).
        "cpu_ms_per_update": {
            name: 1000 * (cpu[rounds][name] - cpu[0][name]) / (clients * rounds) for name in cpu[rounds]
        },
        "expected_updates": expected_updates,
        "merged_updates": merged_total,
        "aggregator_outcomes": outcomes,
        "worker_tasks": tasks,
        "max_mean_error": max(r["mean_error"] for r in per_round),
        "min_one_update_shift": min(r["one_update_shift"] for r in per_round),
        "round_wall_s_median": steady[len(steady) // 2],
        "s_per_update_median": steady[len(steady) // 2] / clients,
        "rss_peak_mb": max(peaks) if peaks else None,
        "rss_first_round_peak_mb": peaks[0] if peaks else None,
        "rss_last_round_peak_mb": peaks[-1] if peaks else None,
        "rss_round_rise_mb_max": max(
            (r["rss_peak_mb"] - r["rss_start_mb"] for r in per_round if r["rss_peak_mb"] is not None), default=None
        ),
        "all_updates_held_mb": clients * update_bytes / 2**20,
        "per_round": per_round,
        "rss_samples": [
            (round(t - submitted, 2), rnd, r) for t, rnd, r in sampler.samples[:: max(1, len(sampler.samples) // 2000)]
        ],
        "spec": spec_data,
    }


def exactly_once(result: dict[str, Any]) -> bool:
    outcomes = result["aggregator_outcomes"]
    return (
        result["merged_updates"] == result["expected_updates"] == outcomes["merged"]
        and outcomes["duplicate"] == outcomes["late"] == outcomes["invalid"] == 0
        and all(r["updates"] == r["num_clients"] == result["clients"] for r in result["per_round"])
        and result["max_mean_error"] < result["min_one_update_shift"] / 10
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    rounds = [r["round"] for r in result["per_round"]]
    left.bar(rounds, [r["updates"] for r in result["per_round"]], color="tab:blue", label="merged")
    left.axhline(result["clients"], color="black", linestyle="--", label="expected")
    left.set(xlabel="round", ylabel="updates", title=f"updates per round ({result['clients']} clients)")
    left.legend()
    samples = result["rss_samples"]
    middle.plot([s[0] for s in samples], [s[2] / 2**20 for s in samples], color="tab:red", linewidth=0.8)
    middle.set(xlabel="seconds since submission", ylabel="aggregator RSS (MB)", title="aggregator memory")
    start = result["per_round"][0]["rss_start_mb"] or 0.0  # after the model is loaded, before round 1 merges
    middle.axhline(start + result["all_updates_held_mb"], color="gray", linestyle=":", label="+ every update held")
    middle.legend()
    right.plot(rounds, [r["wall_s"] for r in result["per_round"]], marker="o", label="round wall time")
    right.plot(rounds, [r["aggregate_s"] + r["eval_s"] for r in result["per_round"]], marker=".", label="commit + eval")
    right.set(xlabel="round", ylabel="seconds", title=f"overhead per round ({result['workers']} workers)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "clients": result["clients"],
        "rounds": result["rounds"],
        "workers": result["workers"],
        "expected_updates": result["expected_updates"],
        "merged_updates": result["merged_updates"],
        "exactly_once": exactly_once(result),
        "max_mean_error": float(f"{result['max_mean_error']:.3g}"),
        "aggregator_rss_peak_mb_first_last": [
            round(result["rss_first_round_peak_mb"], 1),
            round(result["rss_last_round_peak_mb"], 1),
        ],
        "rss_round_rise_mb_max": round(result["rss_round_rise_mb_max"], 1),
        "all_updates_held_mb": round(result["all_updates_held_mb"], 1),
        "round_wall_s_median": round(result["round_wall_s_median"], 2),
        "ms_per_update": round(1000 * result["s_per_update_median"], 2),
        "cpu_ms_per_update": {name: round(value, 2) for name, value in result["cpu_ms_per_update"].items()},
        "job_s": round(result["job_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (each serves many clients)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (default bench/results)")
    parser.add_argument("--name", default="soak", help="report file name (without extension)")
    add_overrides_option(parser)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="pwff-soak-"))
    result = run_soak(args.clients, args.rounds, args.workers, log_dir, args.timeout, overrides=args.overrides)
    summary = summarize(result)
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out / f"{args.name}.json", summary, result, {"soak": result["spec"]})
    plot(result, args.out / f"{args.name}.png")
    shutil.rmtree(log_dir, ignore_errors=True)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
