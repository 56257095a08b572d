"""Authenticated bus messages (shared.signing) and what each consumer refuses before handling anything.

Over the in-process bus with the real scheduler, aggregator and worker classes: a message without the
job's MAC, with a wrong one (another secret, another job, a changed field), an update blob swapped under
its key, an inflated `num_samples` and a task over its job's budget are all refused as InvalidMessage
(so the bus dead-letters them) and counted by reason; the genuine messages still go through.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from prometheus_client import REGISTRY

from services.aggregator.aggregator import Aggregator
from services.worker.worker import Worker
from shared import data
from shared.bus import Queues
from shared.bus.memory import MemoryBus
from shared.codec import encode_tensors
from shared.messages import (
    InvalidMessage,
    JobFailed,
    TrainTask,
    UpdateReady,
    decode_aggregator,
    decode_scheduler,
    encode,
)
from shared.signing import SEAL_FIELDS, BusAuth, JobMac, Unauthenticated
from shared.state import JobState
from tests.harness import drain
from tests.test_aggregator import World, make_world  # noqa: F401 (fixture)


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("pwff_messages_rejected_total", {"reason": reason}) or 0.0


AUTH = BusAuth.from_secret("a-deployment-secret-for-tests")
OTHER = BusAuth.from_secret("another-deployment-secret-000")


def secured(world: World) -> World:
    """The world's services sealing and checking with AUTH (as PWFF_BUS_SECRET makes them)."""
    world.scheduler.auth = AUTH
    world.aggregator.auth = AUTH
    return world


def resealed(body: bytes, auth: BusAuth = AUTH, **changes: Any) -> bytes:
    message = decode_aggregator(body)
    return auth.seal(message.model_copy(update=changes))


def test_every_reason_is_exported_from_zero() -> None:
    for reason in ("missing_tag", "bad_tag", "update_digest", "task_budget", "num_samples"):
        assert REGISTRY.get_sample_value("pwff_messages_rejected_total", {"reason": reason}) is not None


def test_a_sealed_message_verifies_and_any_change_breaks_it() -> None:
    failed = JobFailed(job_id="job-abc", error="boom")
    body = AUTH.seal(failed)
    assert decode_scheduler(body, auth=AUTH) == failed
    data_ = msgpack.unpackb(body)
    assert set(data_) - set(failed.model_dump()) == {"mac"}

    before = rejected("bad_tag")
    for forged in (
        OTHER.seal(failed),  # another deployment's secret
        msgpack.packb({**data_, "error": "forged"}),  # a field changed after sealing
        msgpack.packb({**data_, "job_id": "job-xyz"}),  # replayed against another job: its key differs
    ):
        with pytest.raises(Unauthenticated, match="bad_tag"):
            decode_scheduler(forged, auth=AUTH)
    assert rejected("bad_tag") == before + 3

    before = rejected("missing_tag")
    with pytest.raises(InvalidMessage, match="missing_tag"):
        decode_scheduler(encode(failed), auth=AUTH)
    assert rejected("missing_tag") == before + 1


def test_job_keys_are_derived_per_job_and_secret() -> None:
    mac = JobMac(b"a-deployment-secret-for-tests")
    assert mac.job_key("job-a") != mac.job_key("job-b")
    assert mac.job_key("job-a") != JobMac(b"another-deployment-secret-000").job_key("job-a")
    assert mac.job_key("job-a") == JobMac(b"a-deployment-secret-for-tests").job_key("job-a")
    with pytest.raises(ValueError, match="16 bytes"):
        JobMac(b"short")
    with pytest.raises(ValueError, match="PWFF_BUS_SECRET"):
        BusAuth.from_secret("")
    with pytest.raises(SystemExit, match="PWFF_BUS_SECRET"):
        BusAuth.for_service("")
    assert {"mac"} == SEAL_FIELDS


def test_a_forged_update_is_refused_and_the_real_one_merges(make_world: Callable[..., World]) -> None:  # noqa: F811
    """The attack of issue 12: a well-shaped delta under a sampled client's key, announced first with a huge
    num_samples. Unsealed it is refused before anything is read; the real update then merges (not as a
    duplicate) and the round commits from it alone."""
    world = secured(make_world())
    client = world.clients[0]
    forged = encode_tensors({name: value + 1000.0 for name, value in world.global_state(0).items()}, "float32")
    key = world.update_key(client)
    world.store.put(key, forged)
    forged_announce = UpdateReady(
        job_id=world.job_id, round=1, client=client, attempt=0, key=key, num_samples=100_000, train_loss=0.0,
        compute_s=0.0, upload_bytes=len(forged), digest=hashlib.sha256(forged).hexdigest(),
    )  # fmt: skip
    before = {reason: rejected(reason) for reason in ("missing_tag", "bad_tag")}
    with pytest.raises(InvalidMessage, match="missing_tag"):
        world.aggregator.handle(encode(forged_announce))
    with pytest.raises(InvalidMessage, match="bad_tag"):
        world.aggregator.handle(OTHER.seal(forged_announce))
    assert rejected("missing_tag") == before["missing_tag"] + 1
    assert rejected("bad_tag") == before["bad_tag"] + 1
    assert world.merged() == set()

    real = world.announce(client)  # overwrites the blob under the key, as the real worker does
    world.aggregator.handle(resealed(real))
    assert world.merged() == {client}


def test_a_blob_swapped_under_a_sealed_announcement_is_refused(make_world: Callable[..., World]) -> None:  # noqa: F811
    world = secured(make_world())
    client = world.clients[0]
    sealed = resealed(world.announce(client))
    # Whoever can write the store (not seal messages) swaps the blob after the worker stored it.
    swapped = encode_tensors({name: value + 1000.0 for name, value in world.global_state(0).items()}, "float32")
    world.store.put(world.update_key(client), swapped)
    before = rejected("update_digest")
    with pytest.raises(InvalidMessage, match="SHA-256"):
        world.aggregator.handle(sealed)
    assert rejected("update_digest") == before + 1
    assert world.merged() == set()


def test_num_samples_cannot_exceed_the_clients_shard(make_world: Callable[..., World]) -> None:  # noqa: F811
    world = secured(make_world())
    client = world.clients[0]
    shard = len(data.client_indices(world.spec, client))
    before = rejected("num_samples")
    with pytest.raises(InvalidMessage, match="num_samples"):
        world.aggregator.handle(resealed(world.announce(client, num_samples=shard + 1)))
    assert rejected("num_samples") == before + 1
    world.aggregator.handle(resealed(world.announce(client, num_samples=shard)))
    assert world.merged() == {client}


def test_a_forged_job_failed_is_ignored_and_counted(make_world: Callable[..., World]) -> None:  # noqa: F811
    world = secured(make_world())
    forged = JobFailed(job_id=world.job_id, error="attacker's text")
    before = rejected("missing_tag") + rejected("bad_tag")
    for body in (encode(forged), OTHER.seal(forged)):
        with pytest.raises(InvalidMessage):
            world.scheduler.handle_event(body)
    assert rejected("missing_tag") + rejected("bad_tag") == before + 2
    assert world.scheduler.jobs.state(world.job_id) == JobState.RUNNING
    world.scheduler.handle_event(AUTH.seal(JobFailed(job_id=world.job_id, error="a real failure")))
    assert world.scheduler.jobs.state(world.job_id) == JobState.FAILED


def test_the_dead_letter_path_takes_forged_messages(make_world: Callable[..., World]) -> None:  # noqa: F811
    """Through the bus's own consume loop: a forged message goes to the dead-letter queue, never retried."""
    world = secured(make_world())
    bus: MemoryBus = world.bus
    queues = Queues()
    bus.publish(queues.events, encode(JobFailed(job_id=world.job_id, error="forged")))
    stop = threading.Event()
    consumer = threading.Thread(target=bus.consume, args=(queues.events, world.scheduler.handle_event, stop))
    consumer.start()
    try:
        for _ in range(100):
            if bus.depth(Queues.dead(queues.events)) == 1:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        consumer.join()
    assert bus.depth(Queues.dead(queues.events)) == 1
    assert world.scheduler.jobs.state(world.job_id) == JobState.RUNNING


def test_a_task_over_its_jobs_budget_is_refused(make_world: Callable[..., World]) -> None:  # noqa: F811
    world = secured(make_world())
    worker = Worker(world.bus, world.store, cache_dir=world.cache_dir, auth=AUTH)
    client = world.clients[0]
    inflated = TrainTask(job_id=world.job_id, round=1, client=client, local_steps=world.spec.local_steps * 1000)
    before = rejected("task_budget")
    with pytest.raises(InvalidMessage, match="local_steps"):
        worker.handle(AUTH.seal(inflated))
    assert rejected("task_budget") == before + 1
    assert not world.store.exists(world.update_key(client))  # nothing trained, nothing uploaded
    # A task within the budget is not refused for it (it trains and announces its update).
    worker.handle(AUTH.seal(inflated.model_copy(update={"local_steps": world.spec.local_steps})))
    assert world.store.exists(world.update_key(client))
    # ...and an unsealed task is never looked at.
    with pytest.raises(InvalidMessage, match="missing_tag"):
        worker.handle(encode(inflated))


def test_services_seal_with_their_auth(make_world: Callable[..., World]) -> None:  # noqa: F811
    """A worker's announcement carries the MAC and the blob's digest; the aggregator merges it."""
    world = secured(make_world())
    worker = Worker(world.bus, world.store, cache_dir=world.cache_dir, auth=AUTH)
    client = world.clients[0]
    worker.handle(AUTH.seal(TrainTask(job_id=world.job_id, round=1, client=client, local_steps=1)))
    [announcement] = [
        body for body in drain(world.bus, Queues().aggregate) if decode_aggregator(body, auth=AUTH).type == "update"
    ]
    message = decode_aggregator(announcement, auth=AUTH)
    assert isinstance(message, UpdateReady)
    blob = world.store.get(message.key)
    assert blob is not None and message.digest == hashlib.sha256(blob).hexdigest()
    assert isinstance(world.aggregator, Aggregator)
    world.aggregator.handle(announcement)
    assert world.merged() == {client}
