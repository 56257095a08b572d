"""Bound clients on the in-process bus and store: per-client routing, local data, signed updates.

The same Scheduler, Aggregator and Worker classes as a deployment; each worker is started for one
client with its own JSONL file and key. The distributed version over real RabbitMQ and Redis is
tests/integration/test_bound.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.aggregator.aggregator import Aggregator
from services.scheduler.core import Scheduler
from services.worker.worker import BoundClient, Worker
from shared import data, identity, local_data
from shared.bus import Queues
from shared.bus.memory import MemoryBus
from shared.messages import (
    ClientEvaluated,
    InvalidMessage,
    TrainTask,
    UpdateReady,
    decode_aggregator,
    decode_task,
    encode,
)
from shared.metrics import EVALUATIONS_REJECTED, UPDATES_RECEIVED
from shared.spec import parse_spec
from shared.state import JobState
from shared.store.memory import MemoryStore
from tests.bound import CLIENTS, Enrolled, bound_spec, enroll_clients, markers_in
from tests.harness import drain

pytestmark = pytest.mark.timeout(300)


class RecordingBus(MemoryBus):
    """A MemoryBus that keeps every body published on it: the whole traffic of an in-process cluster."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[str, bytes]] = []
        self._record_lock = threading.Lock()

    def publish(self, queue: str, body: bytes) -> None:
        with self._record_lock:
            self.published.append((queue, bytes(body)))
        super().publish(queue, body)


def _store_values(store: MemoryStore) -> list[bytes]:
    """Every key and value in the store, as bytes (sets, hashes and lists flattened)."""
    out: list[bytes] = []
    for key, value in store._data.items():  # the whole store, whatever its shape
        out.append(key.encode())
        if isinstance(value, bytes):
            out.append(value)
        elif isinstance(value, dict):
            out.extend(f"{k}={v}".encode() for k, v in value.items())
        elif isinstance(value, (set, list)):
            out.extend(v if isinstance(v, bytes) else str(v).encode() for v in value)
        else:
            out.append(repr(value).encode())
    return out


class Federation:
    """Scheduler, aggregator (with the clients file) and one bound worker per given client, on threads."""

    def __init__(self, cache_dir: Path, clients_file: Path, enrolled: list[Enrolled]) -> None:
        self.bus = RecordingBus()
        self.store = MemoryStore()
        registry = identity.ClientRegistry(clients_file)
        self.scheduler = Scheduler(self.bus, self.store, tick_s=0.1, identities=registry)
        self.aggregator = Aggregator(self.bus, self.store, cache_dir=cache_dir, identities=registry)
        self.workers = [
            Worker(
                self.bus,
                self.store,
                cache_dir=cache_dir,
                name=f"worker-{client.id}",
                clients={client.id: BoundClient(client.data, identity.UpdateSigner.from_file(client.id, client.key))},
            )
            for client in enrolled
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Federation:
        for loop in [self.scheduler.run, self.aggregator.run, *(worker.run for worker in self.workers)]:
            thread = threading.Thread(target=loop, args=(self._stop,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def run(self, spec: dict[str, Any], timeout_s: float = 240) -> dict[str, Any]:
        job_id = self.scheduler.submit(parse_spec(spec))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.scheduler.get_job(job_id)
            if JobState(job["state"]).final:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish in {timeout_s}s")


@pytest.fixture
def enrolled(tmp_path: Path) -> tuple[Path, list[Enrolled]]:
    return enroll_clients(tmp_path)


# -- the spec -----------------------------------------------------------------------------------


def test_a_bound_jobs_clients_are_its_ids() -> None:
    spec = parse_spec(bound_spec())
    assert spec.num_clients == 3 and spec.clients_per_round == 3
    assert [spec.clients.identity(c) for c in range(3)] == list(CLIENTS)
    assert parse_spec({"model": "tiny-bert"}).clients.identity(0) is None  # pool: a shard, no identity


@pytest.mark.parametrize(
    ("clients", "extra", "error"),
    [
        ({"kind": "bound"}, {}, "needs clients.ids"),
        ({"kind": "bound", "ids": ["site-a", "site-a"]}, {}, "repeats site-a"),
        ({"kind": "bound", "ids": ["site-a", "site-b"]}, {"num_clients": 3}, "lists 2 clients but num_clients is 3"),
        ({"kind": "pool", "ids": ["site-a"]}, {}, "only for clients.kind 'bound'"),
        ({"kind": "bound", "ids": ["Site A"]}, {}, "pattern"),
    ],
)
def test_bad_client_lists_are_refused(clients: dict[str, Any], extra: dict[str, Any], error: str) -> None:
    with pytest.raises(Exception, match=error):
        parse_spec({"model": "tiny-bert", "clients": clients, **extra})


# -- local data -------------------------------------------------------------------------------


def test_only_the_clients_own_worker_context_reads_its_file(enrolled: tuple[Path, list[Enrolled]]) -> None:
    _, clients = enrolled
    spec = parse_spec(bound_spec())
    with pytest.raises(local_data.LocalDataMissing, match="site-a"):
        data.client_examples(spec, 0)  # the aggregator's and scheduler's view: no file
    with local_data.using({"site-b": clients[1].data}), pytest.raises(local_data.LocalDataMissing):
        data.client_examples(spec, 0)  # site-b's worker cannot read site-a
    with local_data.using({"site-a": clients[0].data}):
        train = data.client_examples(spec, 0)
        test = data.client_test_examples(spec, 0, limit=100)
    assert train and test and not {e.text for e in train} & {e.text for e in test}
    assert all(clients[0].marker in e.text for e in train + test)
    assert len(train) + len(test) == 30 and {e.label for e in test} == set(range(5))  # 20% of each label held out


# -- routing ----------------------------------------------------------------------------------


def test_tasks_go_to_each_clients_own_queue_and_workers_refuse_others(
    enrolled: tuple[Path, list[Enrolled]], cache_dir: Path
) -> None:
    _, clients = enrolled
    bus, store = MemoryBus(), MemoryStore()
    scheduler = Scheduler(bus, store)
    job_id = scheduler.submit(parse_spec(bound_spec()))
    scheduler._open_round(job_id, 1)
    queues = Queues()
    for index, client in enumerate(CLIENTS):
        (body,) = drain(bus, queues.client_tasks(client))
        task = decode_task(body)
        assert isinstance(task, TrainTask) and task.client == index
    assert bus.depth(queues.tasks) == 0  # nothing for the pool

    signer = identity.UpdateSigner.from_file("site-a", clients[0].key)
    worker_a = Worker(bus, store, cache_dir=cache_dir, clients={"site-a": BoundClient(clients[0].data, signer)})
    assert worker_a.task_queues == [queues.client_tasks("site-a")]
    task_for_b = encode(TrainTask(job_id=job_id, round=1, client=1, local_steps=1))
    with pytest.raises(InvalidMessage, match=r"client site-b .* this worker holds site-a"):
        worker_a.handle(task_for_b)
    pool_worker = Worker(bus, store, cache_dir=cache_dir)
    with pytest.raises(InvalidMessage, match=r"none \(a pool worker\)"):
        pool_worker.handle(task_for_b)


# -- a whole job --------------------------------------------------------------------------------


def test_a_bound_job_trains_each_client_on_its_own_data_and_no_example_leaves_its_worker(
    enrolled: tuple[Path, list[Enrolled]], cache_dir: Path
) -> None:
    clients_file, clients = enrolled
    with Federation(cache_dir, clients_file, clients) as federation:
        job = federation.run(bound_spec(personalization={"preset": "head"}))
        assert job["state"] == "succeeded", job
        assert [c["present"] for c in job["clients"]] == [True, True, True]
    assert [m["clients"] for m in job["metrics"][1:]] == [[0, 1, 2], [0, 1, 2]]
    last = job["metrics"][-1]
    # Each client was evaluated on its own held-out split: 20% of each label's 6 texts in its file, 1 x 5 labels.
    assert {c: f["examples"] for c, f in last["per_client"].items()} == {0: 5.0, 1: 5.0, 2: 5.0}
    markers = [client.marker for client in clients]
    # The clients' personal heads stayed in their workers too: only updates and models reached the store.
    assert federation.workers[0].client_tensors.latest_personal(job["id"], 0, (99, 0)) is not None
    assert not [key for key in federation.store._data if ":personal" in key or ":residual" in key]
    assert markers_in([body for _, body in federation.bus.published], markers) == []
    assert markers_in(_store_values(federation.store), markers) == []
    # The traffic held the clients' signed updates, and the markers are really in their files.
    updates = [decode_aggregator(b) for q, b in federation.bus.published if q == Queues().aggregate]
    signed = [u for u in updates if isinstance(u, UpdateReady)]
    assert len(signed) == 6 and all(u.signature and len(u.digest) == 64 for u in signed)
    assert all(client.marker in client.data.read_text() for client in clients)


def test_an_absent_client_is_a_straggler_and_shows_as_absent(
    enrolled: tuple[Path, list[Enrolled]], cache_dir: Path
) -> None:
    clients_file, clients = enrolled
    with Federation(cache_dir, clients_file, clients[:2]) as federation:  # no worker for site-c
        job = federation.run(bound_spec(rounds=1, quorum=0.6, round_deadline_s=4.0))
    assert job["state"] == "succeeded", job
    assert job["metrics"][1]["clients"] == [0, 1]
    assert [(c["id"], c["present"]) for c in job["clients"]] == [("site-a", True), ("site-b", True), ("site-c", False)]


# -- credentials ------------------------------------------------------------------------------


def _unauthenticated() -> float:
    return UPDATES_RECEIVED.labels(outcome="unauthenticated")._value.get()


@pytest.fixture
def round_one(enrolled: tuple[Path, list[Enrolled]], cache_dir: Path) -> Iterator[dict[str, Any]]:
    """A bound job in round 1 with its initial state, an aggregator that knows the clients file."""
    clients_file, clients = enrolled
    bus, store = MemoryBus(), MemoryStore()
    registry = identity.ClientRegistry(clients_file)
    scheduler = Scheduler(bus, store, identities=registry)
    aggregator = Aggregator(bus, store, cache_dir=cache_dir, identities=registry)
    spec = parse_spec(bound_spec())
    job_id = scheduler.submit(spec)
    (init,) = drain(bus, Queues().aggregate)
    aggregator.handle(init)  # InitJob: round 0's state
    scheduler.jobs.update(job_id, state=JobState.RUNNING)
    scheduler._open_round(job_id, 1)
    yield {
        "job_id": job_id,
        "spec": spec,
        "aggregator": aggregator,
        "scheduler": scheduler,
        "store": store,
        "clients": clients,
        "file": clients_file,
    }


def test_a_file_that_does_not_fit_the_job_is_a_clear_task_failure(
    tmp_path: Path, round_one: dict[str, Any], cache_dir: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "label": "weather"}\n')
    signer = identity.UpdateSigner.from_file("site-a", round_one["clients"][0].key)
    aggregator: Aggregator = round_one["aggregator"]
    worker = Worker(
        aggregator.bus, round_one["store"], cache_dir=cache_dir, clients={"site-a": BoundClient(bad, signer)}
    )
    task = TrainTask(job_id=round_one["job_id"], round=1, client=0, local_steps=1)
    with pytest.raises(InvalidMessage, match=r"task failed: local data of this client does not fit the job.*weather"):
        worker.handle(encode(task))


def _update(
    job: dict[str, Any], client: int, signer_client: int, blob: bytes = b"not-a-real-update"
) -> tuple[UpdateReady, bytes]:
    """An update for `client`, its blob stored, signed with the key of `signer_client`."""
    store, job_id = job["store"], job["job_id"]
    aggregator: Aggregator = job["aggregator"]
    key = aggregator.state.tensors.update_key(job_id, 1, client, 0, 0)
    store.put(key, blob)
    announce = UpdateReady(
        job_id=job_id,
        round=1,
        client=client,
        attempt=0,
        key=key,
        num_samples=100000,
        train_loss=0.1,
        compute_s=0.1,
        upload_bytes=len(blob),
        digest=identity.payload_digest(blob),
    )
    enrolled: Enrolled = job["clients"][signer_client]
    signer = identity.UpdateSigner(enrolled.id, identity.load_private_key(enrolled.key))
    signed = announce.model_copy(
        update={"signature": signer.sign(announce.model_dump(mode="json", exclude={"signature"}))}
    )
    return signed, blob


def test_a_worker_with_client_as_key_cannot_publish_for_client_b(round_one: dict[str, Any]) -> None:
    aggregator: Aggregator = round_one["aggregator"]
    forged, _ = _update(round_one, client=1, signer_client=0)  # site-a's key, claiming to be site-b
    before = _unauthenticated()
    with pytest.raises(InvalidMessage, match="does not verify as client 'site-b'"):
        aggregator.handle(encode(forged))
    unsigned = forged.model_copy(update={"signature": ""})
    with pytest.raises(InvalidMessage, match="not signed"):
        aggregator.handle(encode(unsigned))
    inflated = forged.model_copy(update={"num_samples": 5})  # fields changed after signing
    with pytest.raises(InvalidMessage, match="does not verify"):
        aggregator.handle(encode(inflated))
    assert _unauthenticated() == before + 3
    assert not aggregator.state.rounds.merged(round_one["job_id"], 1)


def test_a_swapped_blob_and_a_revoked_client_are_refused(round_one: dict[str, Any]) -> None:
    aggregator: Aggregator = round_one["aggregator"]
    honest, _ = _update(round_one, client=0, signer_client=0)
    round_one["store"].put(honest.key, b"another blob put there later")
    before = _unauthenticated()
    with pytest.raises(InvalidMessage, match="not the one client site-a signed"):
        aggregator.handle(encode(honest))
    assert identity.revoke("site-b", round_one["file"]) is True
    own, _ = _update(round_one, client=1, signer_client=1)
    with pytest.raises(InvalidMessage, match="'site-b' is revoked"):
        aggregator.handle(encode(own))
    assert _unauthenticated() == before + 2


def test_bound_updates_are_refused_without_a_clients_file(round_one: dict[str, Any], cache_dir: Path) -> None:
    aggregator: Aggregator = round_one["aggregator"]
    blind = Aggregator(MemoryBus(), round_one["store"], cache_dir=cache_dir)
    own, _ = _update(round_one, client=0, signer_client=0)
    with pytest.raises(InvalidMessage, match="PWFF_CLIENTS_FILE"):
        blind.handle(encode(own))
    assert aggregator.identities is not None


def test_a_bound_clients_evaluation_counts_only_signed_by_that_client(round_one: dict[str, Any]) -> None:
    scheduler: Scheduler = round_one["scheduler"]
    job_id, clients = round_one["job_id"], round_one["clients"]
    event = ClientEvaluated(job_id=job_id, round=1, client=1, metrics={"global_accuracy": 1.0})
    fields = event.model_dump(mode="json", exclude={"signature"})
    site_a = identity.UpdateSigner.from_file("site-b", clients[0].key)  # A's key, in B's name
    rejected = EVALUATIONS_REJECTED._value.get()
    for forged in (
        event,  # unsigned
        event.model_copy(update={"signature": site_a.sign(fields, "evaluation")}),
        # B's own key, but an update's signature: never valid as an evaluation's
        event.model_copy(update={"signature": identity.UpdateSigner.from_file("site-b", clients[1].key).sign(fields)}),
    ):
        with pytest.raises(InvalidMessage, match="client 'site-b'"):
            scheduler.handle_event(encode(forged))
    assert EVALUATIONS_REJECTED._value.get() == rejected + 3
    assert scheduler.jobs.client_figures(job_id, 1) == {}
    own = identity.UpdateSigner.from_file("site-b", clients[1].key).sign(fields, "evaluation")
    scheduler.handle_event(encode(event.model_copy(update={"signature": own})))
    assert scheduler.jobs.client_figures(job_id, 1) == {1: {"global_accuracy": 1.0}}
