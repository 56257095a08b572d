"""Issue 13's first "done when": a job of three bound clients over the real RabbitMQ and Redis.

Each client's worker is its own OS process (`python -m services.worker --client ID --data FILE --key
KEY`) holding only its own JSONL file, whose every text carries a marker string of that client. The
scheduler and the aggregator run in this process on RabbitBus and RedisStore, through a bus that
records every body it publishes and every body it consumes: with the tasks the scheduler sends and
the updates and evaluations the workers send, that is every message of the job (what is left in a
queue or dead-lettered is drained at the end and checked too). After the job, every key of the
run's namespace in Redis is read (SCAN, each type's values). No marker may appear anywhere.

A forged update for site-b, stored and signed with site-a's key, is published on the real broker
while the job runs: it is dead-lettered and counted, and never merged.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import safetensors.torch
import torch

from services.aggregator.aggregator import Aggregator
from services.scheduler.core import Scheduler
from shared import identity
from shared.bus import Handler, Queues
from shared.bus.rabbitmq import RabbitBus
from shared.messages import TrainTask, UpdateReady
from shared.metrics import UPDATES_RECEIVED
from shared.settings import Settings
from shared.signing import BusAuth
from shared.spec import parse_spec
from shared.state import JobState
from shared.store.redis import RedisStore
from tests.bound import CLIENTS, Enrolled, bound_spec, enroll_clients, markers_in, scheduler_signer
from tests.harness import REPO, drain, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


class RecordingRabbitBus(RabbitBus):
    """RabbitBus keeping every body this process publishes or is handed by a consume loop."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.bodies: list[bytes] = []
        self._record_lock = threading.Lock()

    def _record(self, body: bytes) -> None:
        with self._record_lock:
            self.bodies.append(bytes(body))

    def publish(self, queue: str, body: bytes) -> None:
        self._record(body)
        super().publish(queue, body)

    def consume(self, queue: str, handler: Handler, stop: threading.Event) -> None:
        def recorded(body: bytes) -> None:
            self._record(body)
            handler(body)

        super().consume(queue, recorded, stop)


def _redis_values(url: str, prefix: str) -> list[bytes]:
    """Every key under `prefix` and every value it holds, whatever the type."""
    client = redis.Redis.from_url(url)
    out: list[bytes] = []
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=500):
            out.append(key)
            kind = client.type(key)
            if kind == b"string":
                out.append(client.get(key) or b"")
            elif kind == b"hash":
                out.extend(f for pair in client.hgetall(key).items() for f in pair)
            elif kind == b"list":
                out.extend(client.lrange(key, 0, -1))
            elif kind == b"set":
                out.extend(client.smembers(key))
            elif kind == b"zset":
                out.extend(member for member, _ in client.zrange(key, 0, -1, withscores=True))
            else:
                raise AssertionError(f"unexpected Redis type {kind!r} at {key!r}")
    finally:
        client.close()
    return out


class BoundCluster:
    def __init__(self, folder: Path, cache_dir: Path) -> None:
        self.folder = folder
        self.namespace = f"it-bound-{uuid.uuid4().hex[:8]}"
        self.settings = Settings(namespace=self.namespace)
        self.queues = Queues(self.namespace)
        self.clients_file, self.clients = enroll_clients(folder)
        self.bus = RecordingRabbitBus(self.settings.rabbitmq_url)
        self.store = RedisStore(self.settings.redis_url)
        registry = identity.ClientRegistry(self.clients_file)
        # The bus secret every service (and each bound client's worker) holds: messages carry its MACs.
        self.bus_secret = uuid.uuid4().hex
        self.auth = BusAuth.from_secret(self.bus_secret)
        self.scheduler = Scheduler(
            self.bus,
            self.store,
            namespace=self.namespace,
            tick_s=0.3,
            identities=registry,
            task_signer=scheduler_signer(self.clients_file),
            auth=self.auth,
        )
        self.aggregator = Aggregator(
            self.bus, self.store, namespace=self.namespace, cache_dir=cache_dir, identities=registry, auth=self.auth
        )
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=loop, args=(self._stop,), daemon=True)
            for loop in (self.scheduler.run, self.aggregator.run)
        ]
        env = {
            **os.environ,
            "PWFF_NAMESPACE": self.namespace,
            "PWFF_CACHE_DIR": str(cache_dir),
            "PWFF_TORCH_THREADS": "1",
            "PWFF_BUS_SECRET": self.bus_secret,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            # What each client is handed at enrollment besides its own key: the scheduler's public key.
            "PWFF_SCHEDULER_PUBLIC_KEY": identity.scheduler_public_key(self.clients_file) or "",
        }
        self.logs = folder / "logs"
        self.logs.mkdir()
        self._env = env
        self.workers = [self._worker(client, env) for client in self.clients]
        for thread in self._threads:
            thread.start()

    def _worker(self, client: Enrolled, env: dict[str, str]) -> subprocess.Popen[bytes]:
        # Started with its own file and key only: nothing else of any client is on its command line.
        command = [sys.executable, "-m", "services.worker", "--client", client.id, "--data", str(client.data)]
        command += ["--key", str(client.key), "--state-dir", str(self.state_dir(client.id))]
        log = (self.logs / f"{client.id}.log").open("ab")
        return subprocess.Popen(
            command, cwd=REPO, env={**env, "PWFF_METRICS_PORT": str(free_port())}, stdout=log, stderr=subprocess.STDOUT
        )

    def state_dir(self, client: str) -> Path:
        """The client's own state directory (on its machine: here, a folder of this test's)."""
        return self.folder / "state" / client

    def kill_and_restart(self, index: int) -> None:
        """SIGKILL a client's worker (no cleanup, no ack) and start it again with the same arguments."""
        self.workers[index].kill()
        self.workers[index].wait(timeout=30)
        self.workers[index] = self._worker(self.clients[index], self._env)

    def wait_for_workers(self) -> None:
        def present() -> bool:
            for process in self.workers:
                assert process.poll() is None, f"a worker exited; see {self.logs}"
            return all(self.bus.consumers(self.queues.client_tasks(c)) == 1 for c in CLIENTS)

        wait_until(present, 180, "a worker consuming each client's queue")

    def close(self) -> None:
        self._stop.set()
        for process in self.workers:
            process.terminate()
        for process in self.workers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for thread in self._threads:
            thread.join(timeout=30)
        cleaner = RabbitBus(self.settings.rabbitmq_url)
        cleaner.delete_queues(*self.queues.all, *(self.queues.client_tasks(c) for c in CLIENTS))
        cleaner.close()
        self.bus.close()
        self.store.delete_prefix(f"{self.namespace}:")
        self.store.close()


@pytest.fixture
def cluster(tmp_path: Path, model_cache: Path) -> Iterator[BoundCluster]:
    bound = BoundCluster(tmp_path, model_cache)
    try:
        yield bound
    finally:
        bound.close()
        for log in sorted(bound.logs.glob("*.log")):
            print(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-10:]))


def _forge(cluster: BoundCluster, job_id: str) -> bytes:
    """An update for site-b in round 1, stored under site-b's key, signed with site-a's private key."""
    blob = b"forged update"
    key = cluster.aggregator.state.tensors.update_key(job_id, 1, 1, 0, 7)
    cluster.store.put(key, blob)
    announce = UpdateReady(
        job_id=job_id,
        round=1,
        client=1,
        attempt=7,
        key=key,
        num_samples=100_000,
        train_loss=0.0,
        compute_s=0.0,
        upload_bytes=len(blob),
        digest=identity.payload_digest(blob),
    )
    site_a = identity.UpdateSigner.from_file("site-b", cluster.clients[0].key)  # A's key, B's name
    signature = site_a.sign(announce.model_dump(mode="json", exclude={"signature"}))
    # Sealed with the bus secret, as a bound client's worker holds it: only the signature gives it away.
    return cluster.auth.seal(announce.model_copy(update={"signature": signature}))


def test_three_bound_workers_train_a_job_and_no_example_reaches_the_store_or_the_bus(cluster: BoundCluster) -> None:
    cluster.wait_for_workers()
    unauthenticated = UPDATES_RECEIVED.labels(outcome="unauthenticated")._value.get()
    job_id = cluster.scheduler.submit(parse_spec(bound_spec(personalization={"preset": "head"})))
    wait_until(lambda: cluster.scheduler.jobs.current_round(job_id) >= 1, 120, "round 1 opening")
    forged = _forge(cluster, job_id)
    rogue = RabbitBus(cluster.settings.rabbitmq_url)
    rogue.publish(cluster.queues.aggregate, forged)
    # A task of the rogue's making in site-a's queue (the default exchange takes it): sealed with the bus
    # secret that every bound client holds, but not signed by the scheduler.
    injected = cluster.auth.seal(TrainTask(job_id=job_id, round=1, client=0, local_steps=1000))
    rogue.publish(cluster.queues.client_tasks("site-a"), injected)
    rogue.close()

    def finished() -> bool:
        return JobState(cluster.scheduler.get_job(job_id)["state"]).final

    wait_until(finished, 300, "the job finishing")
    job: dict[str, Any] = cluster.scheduler.get_job(job_id)
    assert job["state"] == "succeeded", job
    assert [m["clients"] for m in job["metrics"][1:]] == [[0, 1, 2], [0, 1, 2]]
    assert [(c["id"], c["present"]) for c in job["clients"]] == [(c, True) for c in CLIENTS]
    assert set(job["metrics"][-1]["per_client"]) == {0, 1, 2}  # each evaluated on its own worker, own data

    # The forgery: dead-lettered, counted, never merged.
    dead = drain(cluster.bus, Queues.dead(cluster.queues.aggregate))
    assert forged in dead
    assert UPDATES_RECEIVED.labels(outcome="unauthenticated")._value.get() == unauthenticated + 1
    # The injected task: dead-lettered by site-a's worker, never run.
    assert drain(cluster.bus, Queues.dead(cluster.queues.client_tasks("site-a"))) == [injected]

    # No example text anywhere: every message of the job, anything left in a queue, every key in Redis.
    leftovers = [
        body
        for queue in (*cluster.queues.all, *(cluster.queues.client_tasks(c) for c in CLIENTS))
        for name in (queue, Queues.dead(queue))
        for body in drain(cluster.bus, name)
    ]
    markers = [client.marker for client in cluster.clients]
    messages = cluster.bus.bodies + dead + leftovers
    assert len(messages) > 20  # tasks, updates, merges, commits, evaluations: the traffic was seen
    assert markers_in(messages, markers) == []
    stored = _redis_values(cluster.settings.redis_url, f"{cluster.namespace}:")
    assert len(stored) > 10
    assert markers_in(stored, markers) == []
    # Each client's personal head stayed in its worker: no personal or residual key in the store.
    assert not [key for key in stored if b":personal" in key or b":residual" in key]
    assert all(client.marker in client.data.read_text() for client in cluster.clients)


def _published_client_model(cluster: BoundCluster, job_id: str, client: int) -> dict[str, torch.Tensor]:
    """The personalized adapter the client's worker published at the job's end (its safetensors)."""
    archive = cluster.scheduler.model_archive(job_id, client)
    assert archive is not None, f"client {client} of {job_id} published no model"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        (member,) = [m for m in tar.getmembers() if m.name.endswith(".safetensors")]
        handle = tar.extractfile(member)
        assert handle is not None
        return safetensors.torch.load(handle.read())


def test_a_bound_worker_killed_mid_job_resumes_from_its_state_directory(cluster: BoundCluster) -> None:
    """Personal tensors and error-feedback residuals live in the client's state directory: a worker
    SIGKILLed mid-job and restarted reads them back, and the job ends exactly as an undisturbed one."""
    cluster.wait_for_workers()
    spec = bound_spec(
        rounds=2,
        personalization={"preset": "head"},
        compression={"quantize": "int8", "rounding": "nearest", "error_feedback": True},
    )

    def run(disturb: bool) -> dict[str, torch.Tensor]:
        job_id = cluster.scheduler.submit(parse_spec(spec))
        if disturb:
            log = cluster.logs / "site-a.log"
            # Killed as it starts its round-2 task: the task is redelivered to its restarted self, which
            # must read the personal state and residual its round-1 task left, from the disk.
            wait_until(
                lambda: f"starting {job_id} round 2 client 0" in log.read_text(errors="replace"), 240, "site-a round 2"
            )
            assert list(cluster.state_dir("site-a").glob(f"{job_id}/client-0/personal-1-0.safetensors"))
            assert list(cluster.state_dir("site-a").glob(f"{job_id}/client-0/residual-1-0.safetensors"))
            cluster.kill_and_restart(0)
        wait_until(lambda: JobState(cluster.scheduler.get_job(job_id)["state"]).final, 400, f"{job_id} finishing")
        job = cluster.scheduler.get_job(job_id)
        assert job["state"] == "succeeded", job
        assert [m["clients"] for m in job["metrics"][1:]] == [[0, 1, 2]] * 2
        return _published_client_model(cluster, job_id, 0)

    undisturbed = run(disturb=False)
    resumed = run(disturb=True)
    assert undisturbed.keys() == resumed.keys() and undisturbed
    assert all(torch.equal(undisturbed[name], resumed[name]) for name in undisturbed)
    # Nothing of a client's own state reached the platform's store.
    stored = _redis_values(cluster.settings.redis_url, f"{cluster.namespace}:")
    assert not [key for key in stored if b":personal" in key or b":residual" in key]


def test_rabbitmq_counts_every_clients_consumers_over_one_connection() -> None:
    """The job view's presence check: one connection and channel for all the clients' queues."""
    settings = Settings(namespace=f"it-presence-{uuid.uuid4().hex[:8]}")
    queues = Queues(settings.namespace)
    names = [queues.client_tasks(c) for c in CLIENTS]
    bus, worker_bus = RabbitBus(settings.rabbitmq_url), RabbitBus(settings.rabbitmq_url)
    connects = [0]
    connect = bus._connect

    def counted() -> Any:
        connects[0] += 1
        return connect()

    bus._connect = counted  # type: ignore[method-assign]
    stop = threading.Event()
    loop = threading.Thread(target=worker_bus.consume, args=(names[1], lambda body: None, stop), daemon=True)
    loop.start()
    try:
        wait_until(lambda: worker_bus.consumer_status(names[1]).connected, 30, "site-b's consumer")
        assert bus.consumer_counts(names) == {names[0]: 0, names[1]: 1, names[2]: 0}
        assert connects[0] == 1
    finally:
        stop.set()
        loop.join(timeout=30)
        bus.delete_queues(*names)
        bus.close()
        worker_bus.close()
