"""bench/overhead.py as `make bench` runs it, plus `--out` and the tiny model for one round: the same job
runs distributed (scheduler, aggregator and two workers as separate processes over the real RabbitMQ and
Redis) and embedded, both reach the same final accuracy, every overhead figure is non-negative and adds
up, the report, figure and table land under `--out`, and the summary is the last line. The services are
gone afterwards, and so are their Redis keys; a run that died leaving them behind is cleaned up here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
import pytest

from shared.bus import Queues
from shared.bus.rabbitmq import RabbitBus
from shared.settings import Settings
from shared.store.redis import RedisStore
from tests.harness import run_bench_script

pytestmark = pytest.mark.integration

# One round of the quickstart job (8 clients, all every round) on the tiny random model, short training.
TINY = ["model=tiny-bert", "local_steps=2", "eval_max_examples=32", "batch_size=4", "max_length=32"]
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SUMMARY_KEYS = {
    "wall_s_per_round",
    "ideal_parallel_compute_s_per_round",
    "eval_s_per_round",
    "overhead_s_per_round",
    "orchestration_s_per_round",
    "overhead_fraction",
    "job_wall_s",
    "final_accuracy",
}
TIMELINE = ("dispatch_s", "between_tasks_s", "last_task_to_close_s", "commit_s", "residual_s")


def services_of(cache: Path) -> list[psutil.Process]:
    """Live processes started with `cache` as their model cache: the bench's services, if any outlived it."""
    found = []
    for process in psutil.process_iter():
        with suppress(psutil.Error):
            if Path(process.environ().get("PWFF_CACHE_DIR", "/nonexistent")).resolve() == cache.resolve():
                found.append(process)
    return found


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    """The bench's model cache; afterwards, no service process started with it may be left running. If one is
    (the bench was killed before it could close its cluster), it is killed and its namespace's queues and keys
    are deleted, as `ServiceCluster.close` would have."""
    cache = tmp_path / "cache"
    yield cache
    left = services_of(cache)
    namespaces = set()
    for process in left:
        with suppress(psutil.Error):
            namespaces.add(process.environ().get("PWFF_NAMESPACE", ""))
            process.kill()
    psutil.wait_procs(left, timeout=30)
    settings = Settings()
    for namespace in namespaces - {""}:
        bus = RabbitBus(settings.rabbitmq_url)
        bus.delete_queues(*Queues(namespace).all)
        bus.close()
        store = RedisStore(settings.redis_url)
        store.delete_prefix(f"{namespace}:")
        store.close()
    assert not left, f"service processes left running: {[p.pid for p in left]}"


def test_make_bench_distributed_and_embedded(tmp_path: Path, cache: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("overhead.*")}
    out = tmp_path / "out"
    overrides = [part for item in TINY for part in ("--set", item)]
    # `make bench` runs `bench/overhead.py` with no arguments; here into `out`, for one round on tiny-bert.
    lines = run_bench_script("overhead.py", ["--out", str(out), "--rounds", "1", *overrides], cache, timeout_s=600)
    summary: dict[str, dict[str, float]] = json.loads(lines[-1])
    assert set(summary) == {"distributed", "embedded"}
    for row in summary.values():
        assert set(row) == SUMMARY_KEYS
    # The same job, seed and clients: both modes commit the same model.
    assert 0.0 < summary["distributed"]["final_accuracy"] == summary["embedded"]["final_accuracy"] <= 1.0

    document: dict[str, Any] = json.loads((out / "overhead.json").read_text())
    assert document["comparison"]["same_final_accuracy"] is True
    assert document["spec"]["model"] == "tiny-bert"
    assert document["spec"]["rounds"] == 1
    assert document["spec"]["clients_per_round"] == 8
    assert document["overrides"] == [*TINY, "rounds=1"]
    for mode, workers in (("distributed", 2), ("embedded", 1)):
        result = document[mode]
        mode_summary = result["summary"]
        assert mode_summary["state"] == "succeeded"
        assert mode_summary["workers"] == workers
        assert {k: mode_summary[k] for k in SUMMARY_KEYS} == summary[mode]
        for key in ("wall_s_per_round", "eval_s_per_round", "overhead_s_per_round", "load_imbalance_s_per_round"):
            assert mode_summary[key] >= 0.0, (mode, key, mode_summary[key])
        assert mode_summary["orchestration_s_per_round"] >= 0.0
        assert 0.0 <= mode_summary["overhead_fraction"] <= 1.0
        assert mode_summary["ideal_parallel_compute_s_per_round"] > 0.0
        assert mode_summary["wall_s_per_round"] >= mode_summary["overhead_s_per_round"]
        [row] = result["rounds"]
        # Every task's compute was read from the workers' log lines, with its start and end.
        assert row["clients"] == row["tasks_logged"] == 8
        assert sum(row["tasks_per_worker"].values()) == 8
        assert row["overhead_s"] >= 0.0 and row["load_imbalance_s"] >= 0.0 and row["orchestration_s"] >= 0.0
        assert row["overhead_s"] == pytest.approx(row["load_imbalance_s"] + row["orchestration_s"], abs=0.002)
        assert row["overhead_s"] == pytest.approx(
            row["wall_s"] - row["eval_s"] - row["ideal_parallel_compute_s"], abs=0.002
        )
        # The timeline split needs each task's start line: its parts add up to the orchestration time.
        timeline = row["timeline"]
        assert all(timeline.get(part) is not None for part in TIMELINE), timeline
        assert sum(timeline[part] for part in TIMELINE) == pytest.approx(row["orchestration_s"], abs=0.01)

    assert sorted(p.name for p in out.iterdir()) == ["overhead.json", "overhead.md", "overhead.png"]
    assert (out / "overhead.png").stat().st_size > 10_000
    table = (out / "overhead.md").read_text()
    assert "| distributed | 2 |" in table and "| embedded | 1 |" in table
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("overhead.*")} == before

    # The distributed run's cluster closed: its processes are gone (the fixture checks) and so are its keys.
    store = RedisStore(Settings().redis_url)
    try:
        job_id = document["distributed"]["job_id"]
        assert not list(store.client.scan_iter(match=f"*{job_id}*", count=1000))
    finally:
        store.close()
