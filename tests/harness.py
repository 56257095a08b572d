"""The three services as local OS processes against the real RabbitMQ and Redis, in a private namespace.

Used by the integration tests and the benchmarks: the same `python -m services.<name>` commands
the Helm chart runs, one process each, with their logs in one folder.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from shared.bus import Queues
from shared.bus.rabbitmq import RabbitBus
from shared.settings import Settings
from shared.store.redis import RedisStore

REPO = Path(__file__).resolve().parents[1]


def drain(bus: Any, queue: str) -> list[bytes]:
    """Take every ready message off `queue` through the bus's public consume API (either bus)."""
    out: list[bytes] = []
    for _ in range(bus.depth(queue)):
        stop = threading.Event()

        def take(body: bytes, stop: threading.Event = stop) -> None:
            out.append(body)
            stop.set()

        bus.consume(queue, take, stop)
    return out


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` every 0.2 s; fail the test naming `what` if it is not true within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def run_bench_script(script: str, args: list[str], cache: Path, timeout_s: float = 900) -> list[str]:
    """`bench/<script>` run as a user would, on one torch thread with `cache` as its model cache; its stdout
    lines (the summary is the last). Fails the test with the script's stderr if it exits non-zero."""
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PWFF_CACHE_DIR": str(cache),
        "PWFF_TORCH_THREADS": "1",
        "BENCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(repo),
    }
    command = [sys.executable, str(repo / "bench" / script), *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo, timeout=timeout_s, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceCluster:
    """Scheduler, aggregator and N workers, each `python -m services.<name>` with its own log file."""

    def __init__(
        self,
        log_dir: Path,
        cache_dir: Path,
        workers: int = 2,
        rabbitmq_url: str | None = None,
        redis_url: str | None = None,
        test_modes: bool = False,
    ) -> None:
        """The brokers are the settings' (the shared ones) unless `rabbitmq_url` / `redis_url` name others.

        test_modes: start each service through tests.plugins.launch, which registers the test modes
        (head-sgd, synthetic) in that process first; the services' code is the same.
        """
        self.launch = ["tests.plugins.launch"] if test_modes else []
        self.namespace = f"it-{uuid.uuid4().hex[:8]}"
        self.token = uuid.uuid4().hex
        self.bus_secret = uuid.uuid4().hex
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.log_dir = log_dir
        self.cache_dir = cache_dir
        urls = {"rabbitmq_url": rabbitmq_url, "redis_url": redis_url}
        self.settings = Settings(namespace=self.namespace, **{name: url for name, url in urls.items() if url})
        self.queues = Queues(self.namespace)
        self.base_env = {
            **os.environ,
            "PWFF_NAMESPACE": self.namespace,
            "PWFF_CACHE_DIR": str(cache_dir),
            "PWFF_LOG_LEVEL": "INFO",
            "PWFF_BUS_SECRET": self.bus_secret,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PWFF_RABBITMQ_URL": self.settings.rabbitmq_url,
            "PWFF_REDIS_URL": self.settings.redis_url,
        }
        self.scheduler = self._start("scheduler", self._scheduler_env())
        self.aggregator_metrics_port = free_port()
        self.aggregator = self._start("aggregator", self._aggregator_env())
        self.workers: list[subprocess.Popen[bytes]] = []
        self.worker_logs: list[Path] = []
        self.worker_metric_ports: list[int] = []
        for index in range(workers):
            self._add_worker(index)
        try:
            self.wait_ready()
        except BaseException:
            self.close()  # the caller gets no object to close: leave no processes behind
            raise

    def _start(self, service: str, env: dict[str, str], log_name: str | None = None) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{log_name or service}.log"
        handle = log.open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", *self.launch, f"services.{service}"],
            cwd=REPO,
            env={**self.base_env, **env},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )

    def _scheduler_env(self) -> dict[str, str]:
        return {"PWFF_API_TOKEN": self.token, "PWFF_API_PORT": str(self.api_port)}

    def _aggregator_env(self) -> dict[str, str]:
        return {"PWFF_METRICS_PORT": str(self.aggregator_metrics_port)}

    def restart_scheduler(self) -> None:
        """Start the scheduler again (same port and token), as its Deployment would after a crash."""
        if self.scheduler.poll() is None:
            raise RuntimeError("the scheduler is still running")
        self.scheduler = self._start("scheduler", self._scheduler_env())

    def restart_aggregator(self) -> None:
        if self.aggregator.poll() is None:
            raise RuntimeError("the aggregator is still running")
        self.aggregator = self._start("aggregator", self._aggregator_env())

    def _add_worker(self, index: int) -> None:
        port = free_port()
        name = f"worker-{index}-{len(self.worker_logs)}"
        process = self._start("worker", {"PWFF_METRICS_PORT": str(port), "PWFF_TORCH_THREADS": "1"}, name)
        log = self.log_dir / f"{name}.log"
        if index < len(self.workers):
            self.workers[index], self.worker_logs[index], self.worker_metric_ports[index] = process, log, port
        else:
            self.workers.append(process)
            self.worker_logs.append(log)
            self.worker_metric_ports.append(port)

    def replace_worker(self, index: int) -> None:
        self._add_worker(index)

    def wait_ready(self, timeout_s: float = 180) -> None:
        """Every service process alive, the scheduler ready, the aggregator and every worker serving /metrics."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for process in [self.scheduler, self.aggregator, *self.workers]:
                if process.poll() is not None:
                    raise RuntimeError(f"a service exited with {process.returncode}; see logs in {self.log_dir}")
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200 and all(
                    self._metrics_up(port) for port in [self.aggregator_metrics_port, *self.worker_metric_ports]
                ):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"services not ready after {timeout_s}s; see logs in {self.log_dir}")

    @staticmethod
    def _metrics_up(port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, port: int, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if re.match(rf"^{re.escape(name)}(\{{.*\}})? ", line):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def submit(self, spec: dict[str, Any]) -> str:
        with self.api() as client:
            response = client.post("/v1/jobs", json=spec)
            response.raise_for_status()
            return str(response.json()["id"])

    def wait(self, job_id: str, timeout_s: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self.api() as client:
            while time.monotonic() < deadline:
                job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    return job
                time.sleep(0.3)
        raise TimeoutError(f"job {job_id} did not finish in {timeout_s}s; see logs in {self.log_dir}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args, "--api", self.api_url, "--token", self.token],
            cwd=REPO,
            env=self.base_env,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )

    def close(self) -> None:
        processes = [*self.workers, self.aggregator, self.scheduler]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        bus = RabbitBus(self.settings.rabbitmq_url)
        bus.delete_queues(*self.queues.all)
        bus.close()
        store = RedisStore(self.settings.redis_url)
        store.delete_prefix(f"{self.namespace}:")
        store.close()
