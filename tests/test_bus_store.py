"""What only one twin has: MemoryStore's exact TTL clock and batch locking, MemoryBus's consumer
crash, and the shared retry policy itself. Everything both twins promise is in tests/contract/.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

import shared.store.memory as memory_store
from shared.bus import DEFAULT_POLICY, MAX_FAILURES, Queues
from shared.bus.memory import MemoryBus
from shared.bus.policy import Ack, DeadLetter, FailureTracker, Retry, RetryPolicy
from shared.bus.rabbitmq import RabbitBus
from shared.messages import InvalidMessage
from shared.store.memory import MemoryStore, WrongType

Q = "test.q"


# --- store ------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(memory_store, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def test_put_if_absent_sees_expired_keys_as_absent(store: MemoryStore, clock: FakeClock) -> None:
    assert store.put_if_absent("lock", b"a", ttl_s=3)
    clock.now += 2
    assert not store.put_if_absent("lock", b"b", ttl_s=3)
    clock.now += 1
    assert store.put_if_absent("lock", b"c", ttl_s=3)
    assert store.get("lock") == b"c"
    clock.now += 2.9
    assert store.get("lock") == b"c"  # the new TTL counts from the new put


def test_batch_put_with_ttl(store: MemoryStore, clock: FakeClock) -> None:
    batch = store.batch()
    batch.put("k", b"v", ttl_s=5)
    clock.now += 10  # the TTL counts from execute, not from when the op was queued
    batch.execute()
    assert store.get("k") == b"v"
    clock.now += 5
    assert store.get("k") is None


def test_batch_is_invisible_to_concurrent_readers_until_complete(store: MemoryStore) -> None:
    """A reader polling two keys written by one batch never sees one without the other."""
    seen_partial = threading.Event()
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            with store._lock:  # read both keys in one consistent snapshot
                a, b = store.exists("a"), store.exists("b")
            if a != b:
                seen_partial.set()

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(200):
        batch = store.batch()
        if i % 2 == 0:
            batch.put("a", b"1")
            batch.put("b", b"1")
        else:
            batch.delete("a")
            batch.delete("b")
        batch.execute()
    done.set()
    thread.join()
    assert not seen_partial.is_set()


def test_a_wrong_kind_of_key_raises_wrong_type(store: MemoryStore) -> None:
    store.hash_set("h", {"a": "1"})
    with pytest.raises(WrongType, match="'h' holds a dict, not a bytes"):
        store.get("h")
    assert issubclass(WrongType, TypeError)


# --- retry policy -----------------------------------------------------------------------------


def test_both_buses_default_to_one_policy() -> None:
    assert MAX_FAILURES == DEFAULT_POLICY.max_failures == 5
    assert MemoryBus().policy is DEFAULT_POLICY
    assert RabbitBus("amqp://guest:guest@127.0.0.1:1/%2F").policy is DEFAULT_POLICY  # connects lazily
    tiny = RetryPolicy(max_failures=2, base_delay_s=0.0)
    assert MemoryBus(policy=tiny).policy is tiny
    assert RabbitBus("amqp://guest:guest@127.0.0.1:1/%2F", policy=tiny).policy is tiny


def test_delays_double_from_the_base_up_to_the_cap() -> None:
    policy = RetryPolicy(max_failures=10, base_delay_s=0.2, max_delay_s=1.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    assert [DEFAULT_POLICY.delay_s(n) for n in range(1, MAX_FAILURES)] == pytest.approx([0.2, 0.4, 0.8, 1.6])
    with pytest.raises(ValueError):
        RetryPolicy(max_failures=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay_s=-1)


def test_tracker_decisions() -> None:
    tracker = FailureTracker(RetryPolicy(max_failures=3, base_delay_s=0.1, max_delay_s=5.0))
    assert tracker.decide(b"m", None) == Ack()
    assert tracker.decide(b"m", InvalidMessage("no such job")) == DeadLetter("no such job")
    assert tracker.decide(b"m", RuntimeError("boom")) == Retry(delay_s=0.1, failures=1)
    assert tracker.decide(b"other", RuntimeError("x")) == Retry(delay_s=0.1, failures=1)  # counted per body
    assert tracker.decide(b"m", RuntimeError("boom")) == Retry(delay_s=0.2, failures=2)
    assert tracker.decide(b"m", RuntimeError("boom")) == DeadLetter("failed 3 times: boom")
    assert tracker.failures(b"m") == 0  # forgotten once dead-lettered
    assert tracker.decide(b"m", RuntimeError("again")) == Retry(delay_s=0.1, failures=1)
    assert tracker.decide(b"m", None) == Ack()
    assert tracker.failures(b"m") == 0  # forgotten once acked
    tracker.decide(b"m", RuntimeError("again"))
    assert tracker.decide(b"m", InvalidMessage("now invalid")) == DeadLetter("now invalid")
    assert tracker.failures(b"m") == 0 and tracker.failures(b"other") == 1


def test_a_single_failure_allowed_dead_letters_at_once() -> None:
    tracker = FailureTracker(RetryPolicy(max_failures=1))
    assert tracker.decide(b"m", OSError("gone")) == DeadLetter("failed 1 times: gone")


def test_tracker_memory_is_bounded() -> None:
    tracker = FailureTracker(RetryPolicy(max_failures=3), max_tracked=100)
    big = b"x" * 1_000_000
    tracker.decide(big, RuntimeError("boom"))
    assert tracker.failures(big) == 1
    for i in range(500):
        tracker.decide(f"body-{i}".encode(), RuntimeError("boom"))
    assert len(tracker) == 100
    assert tracker.failures(big) == 0  # the oldest entries went first
    assert tracker.failures(b"body-499") == 1
    assert all(len(k) == 32 for k in tracker._failures)  # sha256 digests, not bodies


# --- MemoryBus --------------------------------------------------------------------------------


class ConsumerCrash(BaseException):
    """Not an Exception: what a dying consumer thread (SystemExit, KeyboardInterrupt) raises."""


def test_a_memory_consumer_that_dies_mid_handler_leaves_its_message_for_the_next() -> None:
    bus = MemoryBus(policy=RetryPolicy(max_failures=3, base_delay_s=0.0))
    bus.publish(Q, b"first")
    bus.publish(Q, b"second")

    def crash(body: bytes) -> None:
        raise ConsumerCrash

    with pytest.raises(ConsumerCrash):
        bus.consume(Q, crash, threading.Event())
    assert bus.depth(Q) == 2  # back at the head, not acked, not counted as a failure
    got: list[bytes] = []
    stop = threading.Event()
    thread = threading.Thread(target=bus.consume, args=(Q, got.append, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert got == [b"first", b"second"]
    assert bus.depth(Queues.dead(Q)) == 0


@pytest.mark.integration
def test_an_idle_publisher_keeps_its_connection() -> None:
    """Between publishes nobody calls into pika: the bus must still answer the broker's heartbeats, or
    RabbitMQ closes the connection after two missed intervals and the next publish meets a dead socket."""
    from shared.settings import Settings

    queue = f"heartbeat-test-{time.monotonic_ns()}"
    bus = RabbitBus(Settings().rabbitmq_url, heartbeat_s=1)
    try:
        bus.publish(queue, b"first")
        first = bus._publish_conn
        time.sleep(6)  # several heartbeat intervals with nothing to publish
        assert first is not None and first.is_open
        connects = 0
        original = bus._connect

        def counting() -> object:
            nonlocal connects
            connects += 1
            return original()

        bus._connect = counting  # type: ignore[method-assign]
        bus.publish(queue, b"second")
        assert connects == 0, "the idle publishing connection was dropped and had to be reopened"
        assert bus._publish_conn is first
        assert bus.depth(queue) == 2
    finally:
        bus.delete_queues(queue)
        bus.close()
