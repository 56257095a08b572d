"""bench/step.py as the README runs it (`--parts step,eval --rounds 4`, then `--parts threads`), on the tiny
model (`--set`): the quickstart job's pwff training tasks paired with the bare loop, its evaluation times,
and the two-workers-against-embedded comparison with its bare-loop floor, each with its summary keys, its
report and plot under `--out` (never into bench/results), and the summary as the last line.

The README's `OMP_NUM_THREADS=2` is how the step part gets its torch threads; the harness runs every bench
script at OMP_NUM_THREADS=1, so the report must say 1 thread. The threads part runs in its fastest faithful
form: one placement (`pinned`), one round, and one floor measurement of two steps per setup; the defaults
(three placements, two rounds, three floor measurements of 20 steps) take about 9 minutes here even on the
tiny model, almost all of it starting service and bare-loop processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from tests.harness import REPO, run_bench_script

TINY = ["--set", "model=tiny-bert", "--set", "local_steps=2", "--set", "eval_max_examples=32"]
CLIENTS = 8  # examples/quickstart.yaml: every client in every round


def committed(name: str) -> dict[str, tuple[int, int] | None]:
    """bench/results/NAME.json and .png as they are (None where absent): a run under `--out` leaves them alone."""
    files = [REPO / "bench" / "results" / f"{name}.{ext}" for ext in ("json", "png")]
    return {f.name: (f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for f in files}


def step(tmp_path: Path, *args: str) -> tuple[list[str], dict[str, Any]]:
    """`bench/step.py ARGS --out TMP/out` on the tiny model: its stdout lines and its report."""
    out, before = tmp_path / "out", committed("step")
    lines = run_bench_script("step.py", [*args, "--out", str(out), *TINY], tmp_path / "cache")
    assert committed("step") == before
    assert {p.name for p in out.iterdir()} == {"step.json", "step.png"}
    assert (out / "step.png").stat().st_size > 10_000
    report: dict[str, Any] = json.loads((out / "step.json").read_text())
    assert report["summary"] == json.loads(lines[-1])
    assert report["specs"]["quickstart"]["model"] == "tiny-bert"
    return lines, report


def test_step_and_eval_parts(tmp_path: Path) -> None:
    lines, report = step(tmp_path, "--parts", "step,eval", "--rounds", "2")
    summary = report["summary"]
    assert set(summary) == {
        "bare_step_s",
        "pwff_step_s",
        "step_ratio",
        "step_ratio_of_sums",
        "first_eval_ratio",
        "round0_eval_ratio",
    }
    assert all(value > 0 for value in summary.values()), summary
    assert any(line.startswith("steady: pwff ") for line in lines[:-1])
    assert set(report["results"]) == {"step", "eval"}
    result = report["results"]["step"]
    assert result["threads"] == report["machine"]["threads"] == 1  # OMP_NUM_THREADS, as the harness sets it
    # A pair per training task: every client in both rounds, each paired with as many bare-loop steps.
    pairs = result["pairs"]
    assert sorted((p["round"], p["client"]) for p in pairs) == [(r, c) for r in (1, 2) for c in range(CLIENTS)]
    assert all(p["steps"] == 2 and p["compute_s"] > 0 and p["bare_s"] > 0 for p in pairs)
    # The ratios are over round 2's pairs; round 1 (the model load) is reported apart.
    steady = result["steady"]
    assert steady["min_ratio"] - 1e-3 <= summary["step_ratio"] <= steady["max_ratio"] + 1e-3
    assert [m["round"] for m in result["job_metrics"]] == [0, 1, 2]
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in result["job_metrics"])
    evaluation = report["results"]["eval"]
    assert len(evaluation["eval_s_by_round"]) == 3 and min(evaluation["eval_s_by_round"]) > 0


@pytest.mark.integration
def test_threads_part(tmp_path: Path) -> None:
    """Two `python -m services.worker` processes over the real RabbitMQ and Redis, pinned to a CPU each,
    against the same job embedded (at this process's threads and at one), and the bare-loop floor."""
    _, report = step(
        tmp_path,
        *("--parts", "threads", "--placements", "pinned", "--thread-rounds", "1"),
        *("--floor-steps", "2", "--floor-repeats", "1"),
    )
    summary = report["summary"]
    assert set(summary) == {
        "threads_malloc_mmap_threshold",
        "threads_ratio_pinned",
        "threads_ratio_pinned_same_threads",
        "threads_floor",
        "threads_all_threads_speedup",
    }
    assert summary["threads_malloc_mmap_threshold"] == Settings().malloc_mmap_threshold
    assert all(summary[key] > 0 for key in summary), summary
    assert set(report["results"]) == {"threads"}  # nothing of the other parts: they were not asked for
    threads = report["results"]["threads"]
    for variant in ("embedded", "two_workers_pinned", "embedded_1_thread"):
        metrics = threads[variant]["metrics"]
        assert [(m["round"], m.get("updates")) for m in metrics[1:]] == [(1, CLIENTS)], variant
        assert threads[variant]["per_task_compute_s"] > 0
    assert threads["embedded_1_thread"]["threads"] == 1
    # Pinned to one CPU each, with no thread setting in their environment, each worker sizes itself to one thread.
    assert [t.split()[0] for t in threads["two_workers_pinned"]["worker_threads"]] == ["1", "1"]
    assert set(threads["two_workers_pinned"]["cpu_s_during_job"]) == {"scheduler", "aggregator", "worker-0", "worker-1"}
    floor = threads["floor"]
    assert floor["steps"] == 2 and floor["cpus"] == len(os.sched_getaffinity(0))
    assert {key: len(value) for key, value in floor["step_s"].items()} == {
        "alone_all_threads": 1,
        "alone_1_thread": 1,
        "two_at_once_1_thread": 1,
    }
