"""The fault drill: every service and both brokers killed or restarted mid-job, over brokers of its own.

The services run as separate processes (tests/harness.py) over a private RabbitMQ node and a private
redis-server that this module starts (tests/brokers.py), so it can stop and restart them; the shared
brokers are never touched. Each disturbed job must reach `succeeded` with a final adapter equal, bit for
bit, to the undisturbed run's (same thread count: PWFF_TORCH_THREADS=1 in every worker). A store that
loses its state must fail the jobs it held with a clear error, and a round nobody can finish must fail at
its deadline. Run it alone with scripts/fault-drill.sh (or `pytest -m faults`).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from shared.state import Repositories
from shared.store.redis import RedisStore
from tests.brokers import PrivateRabbit, PrivateRedis
from tests.harness import ServiceCluster, wait_until
from tests.integration.test_distributed import adapter_tensors

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# Small and quick: tiny-bert, 4 clients all sampled (so every run merges the same updates), 2 rounds. The
# round deadline is far beyond any disturbance here: a round must finish from its updates, not at its deadline.
SPEC: dict[str, Any] = {
    "name": "fault-drill",
    "model": "tiny-bert",
    "dataset": "bbc-news",
    "num_clients": 4,
    "clients_per_round": 4,
    "rounds": 2,
    "local_steps": 2,
    "batch_size": 4,
    "max_length": 32,
    "eval_max_examples": 16,
    "lora": {"r": 4, "alpha": 8},
    "seed": 11,
    "round_deadline_s": 300,
}
JOB_TIMEOUT_S = 420.0  # a lost control message is resent after 60 s; even two fit


class Drill:
    def __init__(self, cluster: ServiceCluster, rabbit: PrivateRabbit, redis: PrivateRedis) -> None:
        self.cluster = cluster
        self.rabbit = rabbit
        self.redis = redis
        self.state = Repositories(RedisStore(redis.url), cluster.namespace)

    def mid_round(self, job_id: str) -> int | None:
        """The round in progress if some of its updates are merged and it is not committed yet."""
        try:
            round_ = self.state.jobs.current_round(job_id)
            if round_ >= 1 and self.state.rounds.merged(job_id, round_):
                return None if self.state.rounds.is_committed(job_id, round_) else round_
        except Exception:  # the store restarting under a previous case's poll: ask again
            return None
        return None

    def when_mid_round(self, job_id: str, timeout_s: float = 300) -> int:
        """Poll (tightly: a round lasts seconds) until `job_id` is mid-round; returns the round."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            round_ = self.mid_round(job_id)
            if round_ is not None:
                return round_
            time.sleep(0.01)
        raise AssertionError(f"job {job_id} was never seen mid-round; see logs in {self.cluster.log_dir}")

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The job view, None while the API says 404 (e.g. the store just lost it) or cannot answer."""
        try:
            with self.cluster.api() as client:
                response = client.get(f"/v1/jobs/{job_id}")
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None  # type: ignore[no-any-return]

    def wait_final(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job is not None and job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not final after {timeout_s}s; see logs in {self.cluster.log_dir}")

    def adapter(self, job_id: str) -> dict[str, torch.Tensor]:
        with self.cluster.api() as client:
            response = client.get(f"/v1/jobs/{job_id}/models/global")
        response.raise_for_status()
        return adapter_tensors(response.content)

    def all_alive(self) -> bool:
        return all(p.poll() is None for p in [self.cluster.scheduler, self.cluster.aggregator, *self.cluster.workers])


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def assert_bit_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"{len(different)} tensors differ from the undisturbed run's, e.g. {different[:3]}"


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    return response.status_code, response.json()


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Drill]:
    rabbit = PrivateRabbit()
    redis = PrivateRedis(tmp_path_factory.mktemp("fault-redis"))
    logs = tmp_path_factory.mktemp("fault-logs")
    cluster: ServiceCluster | None = None
    try:
        cluster = ServiceCluster(logs, model_cache, workers=2, rabbitmq_url=rabbit.url, redis_url=redis.url)
        yield Drill(cluster, rabbit, redis)
    finally:
        if cluster is not None:
            cluster.close()
        redis.close()
        rabbit.close()
        for log in sorted(logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {log.name} (last lines)\n" + "\n".join(tail))


@pytest.fixture(scope="module")
def reference(drill: Drill) -> dict[str, torch.Tensor]:
    """The undisturbed run, on the same cluster and brokers."""
    job_id = drill.cluster.submit(SPEC)
    job = drill.wait_final(job_id)
    assert job["state"] == "succeeded", job
    return drill.adapter(job_id)


def run_disturbed(drill: Drill, reference: dict[str, torch.Tensor], disturb: Callable[[str], None]) -> str:
    job_id = drill.cluster.submit({**SPEC, "name": "fault-drill-disturbed"})
    disturb(job_id)
    job = drill.wait_final(job_id)
    assert job["state"] == "succeeded", job
    assert [m["round"] for m in job["metrics"]] == [0, 1, 2]
    assert_bit_equal(drill.adapter(job_id), reference)
    return job_id


def test_aggregator_killed_mid_round(drill: Drill, reference: dict[str, torch.Tensor]) -> None:
    log = drill.cluster.log_dir / "aggregator.log"

    def disturb(job_id: str) -> None:
        round_ = drill.when_mid_round(job_id)
        kill(drill.cluster.aggregator)
        merged = drill.state.rounds.merged(job_id, round_)
        assert merged and not drill.state.rounds.is_committed(job_id, round_), "not killed mid-round"
        drill.cluster.restart_aggregator()

    job_id = run_disturbed(drill, reference, disturb)
    # The new aggregator rebuilt the round's running sum from the stored updates it had merged.
    assert f"rebuilt {job_id} round" in log.read_text(errors="replace")


def test_scheduler_killed_mid_round(drill: Drill, reference: dict[str, torch.Tensor]) -> None:
    def disturb(job_id: str) -> None:
        drill.when_mid_round(job_id)
        kill(drill.cluster.scheduler)
        time.sleep(2)  # the aggregator's events pile up meanwhile
        drill.cluster.restart_scheduler()
        drill.cluster.wait_ready()

    run_disturbed(drill, reference, disturb)


def test_rabbitmq_restarted_mid_job(drill: Drill, reference: dict[str, torch.Tensor]) -> None:
    def disturb(job_id: str) -> None:
        drill.when_mid_round(job_id)
        drill.rabbit.restart()  # durable queues and persistent messages come back with it

    run_disturbed(drill, reference, disturb)
    assert drill.all_alive()


def test_redis_restarted_mid_job_with_aof(drill: Drill, reference: dict[str, torch.Tensor]) -> None:
    """Restarted the way a pod restart does it (SIGTERM: Redis flushes its AOF and exits), with the chart's
    persistence (appendonly yes, appendfsync everysec): nothing is lost."""

    def disturb(job_id: str) -> None:
        drill.when_mid_round(job_id)
        drill.redis.restart(keep_data=True)

    run_disturbed(drill, reference, disturb)
    assert drill.all_alive()


def test_redis_restarted_without_persistence_fails_the_job_clearly(drill: Drill) -> None:
    cluster = drill.cluster
    job_id = cluster.submit({**SPEC, "name": "fault-drill-state-lost"})
    drill.when_mid_round(job_id)
    drill.redis.restart(keep_data=False)  # as a Redis without persistence comes back: empty

    job = drill.wait_final(job_id, timeout_s=120)  # no hang
    assert job["state"] == "failed", job
    assert "the store lost its state" in job["error"] and "appendonly yes" in job["error"], job["error"]
    # No silent restart from scratch: round 0 (the initial state) is not made again. A round whose commit was
    # already under way as the store emptied may have landed; nothing else did.
    assert [m["round"] for m in job["metrics"] if m["round"] == 0] == [], job["metrics"]
    with cluster.api() as client:
        model = client.get(f"/v1/jobs/{job_id}/models/global")
    if model.status_code == 200:  # a commit that was in flight as the store emptied: whole, never partial
        assert all(torch.isfinite(t).all() for t in adapter_tensors(model.content).values())
    else:
        assert model.status_code == 404
    time.sleep(3)  # a few ticks later: still failed, nothing restarted it
    assert drill.job(job_id) == job

    # The services stay up, and /readyz says they are ready again (the scheduler's state check included).
    assert drill.all_alive()
    wait_until(lambda: readyz(cluster.api_port)[0] == 200, 60, "the scheduler ready again")
    checks = {"ready": True, "consumer": True, "broker": True, "store": True, "state": True}
    assert readyz(cluster.api_port)[1] == checks
    for port in [cluster.aggregator_metrics_port, *cluster.worker_metric_ports]:
        wait_until(lambda port=port: readyz(port)[0] == 200, 60, f"the service on {port} ready again")
    assert cluster.metric(cluster.api_port, "pwff_store_state_lost_total") == 1
    # ...and they still run jobs.
    after = drill.wait_final(cluster.submit({**SPEC, "rounds": 1, "name": "fault-drill-after-loss"}))
    assert after["state"] == "succeeded", after


def test_a_round_nobody_can_finish_fails_at_its_deadline(drill: Drill) -> None:
    """Every worker gone: the round cannot reach its quorum, so the job fails at the round deadline, with the
    reason, instead of staying running forever."""
    cluster = drill.cluster
    for worker in cluster.workers:
        kill(worker)
    try:
        job_id = cluster.submit({**SPEC, "name": "fault-drill-no-workers", "round_deadline_s": 5, "quorum": 0.5})
        job = drill.wait_final(job_id, timeout_s=120)
        assert job["state"] == "failed", job
        assert job["error"] == "round 1 reached its deadline (5s) with 0 of 4 updates; the quorum is 2", job["error"]
    finally:
        for index in range(len(cluster.workers)):
            cluster.replace_worker(index)
        cluster.wait_ready()


def test_the_drill_script_runs_this_suite() -> None:
    """`scripts/fault-drill.sh` as the README shows it reaches this file's drill (collected, not run twice)."""
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        ["bash", "scripts/fault-drill.sh", "--collect-only", "-q"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for case in ("test_aggregator_killed_mid_round", "test_redis_restarted_without_persistence_fails_the_job_clearly"):
        assert case in result.stdout, result.stdout[-2000:]
