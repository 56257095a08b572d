"""The in-process twins of RabbitMQ and Redis: same semantics, so the embedded mode is faithful."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

import shared.bus.memory as memory_bus
import shared.store.memory as memory_store
from shared.bus import MAX_FAILURES, Queues
from shared.bus.memory import MemoryBus
from shared.messages import InvalidMessage
from shared.store.memory import MemoryStore

Q = "test.q"
DEAD = Queues.dead(Q)


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


def test_put_get_exists_delete(store: MemoryStore) -> None:
    assert store.ping()
    assert store.get("k") is None and not store.exists("k")
    store.put("k", bytearray(b"v1"))
    value = store.get("k")
    assert value == b"v1" and isinstance(value, bytes)
    store.put("k", b"v2")
    assert store.get("k") == b"v2" and store.exists("k")
    store.delete("k", "never-there")
    assert store.get("k") is None and not store.exists("k")
    store.delete()  # no keys: no error


def test_get_of_a_non_string_key_is_none(store: MemoryStore) -> None:
    store.hash_set("h", {"a": "1"})
    assert store.exists("h")
    assert store.get("h") is None


def test_put_if_absent(store: MemoryStore) -> None:
    assert store.put_if_absent("k", b"first") is True
    assert store.put_if_absent("k", b"second") is False
    assert store.get("k") == b"first"
    store.delete("k")
    assert store.put_if_absent("k", b"third") is True
    assert store.get("k") == b"third"


def test_ttl_expiry(store: MemoryStore, clock: FakeClock) -> None:
    store.put("short", b"x", ttl_s=10)
    store.put("forever", b"y")
    clock.now += 9.9
    assert store.get("short") == b"x" and store.exists("short")
    clock.now += 0.1
    assert store.get("short") is None and not store.exists("short")
    assert store.get("forever") == b"y"


def test_put_without_ttl_clears_an_earlier_ttl(store: MemoryStore, clock: FakeClock) -> None:
    store.put("k", b"x", ttl_s=5)
    store.put("k", b"y")  # like Redis SET: a plain set makes the key persistent
    clock.now += 100
    assert store.get("k") == b"y"


def test_put_if_absent_sees_expired_keys_as_absent(store: MemoryStore, clock: FakeClock) -> None:
    assert store.put_if_absent("lock", b"a", ttl_s=3)
    clock.now += 2
    assert not store.put_if_absent("lock", b"b", ttl_s=3)
    clock.now += 1
    assert store.put_if_absent("lock", b"c", ttl_s=3)
    assert store.get("lock") == b"c"
    clock.now += 2.9
    assert store.get("lock") == b"c"  # the new TTL counts from the new put


def test_set_add_returns_whether_the_member_is_new(store: MemoryStore) -> None:
    assert store.set_members("s") == set()
    assert store.set_add("s", "a") is True
    assert store.set_add("s", "a") is False
    assert store.set_add("s", "b") is True
    members = store.set_members("s")
    assert members == {"a", "b"}
    members.add("c")  # a copy: the store is not changed through it
    assert store.set_members("s") == {"a", "b"}


def test_hash_set_merges_and_stringifies(store: MemoryStore) -> None:
    store.hash_set("h", {"a": "1", "b": "2"})
    store.hash_set("h", {"b": "3", "c": 4})  # type: ignore[dict-item]
    assert store.hash_get_all("h") == {"a": "1", "b": "3", "c": "4"}
    assert store.hash_get("h", "c") == "4"
    assert store.hash_get("h", "zzz") is None and store.hash_get("missing", "a") is None
    assert store.hash_get_all("missing") == {}
    view = store.hash_get_all("h")
    view["a"] = "changed"
    assert store.hash_get("h", "a") == "1"


def test_list_append_keeps_order(store: MemoryStore) -> None:
    assert store.list_range("l") == []
    for item in (b"one", b"two", b"three"):
        store.list_append("l", item)
    assert store.list_range("l") == [b"one", b"two", b"three"]


def test_delete_prefix_removes_only_matching_keys(store: MemoryStore) -> None:
    store.put("pwff:job:a:round:1:update:0:0", b"x")
    store.put("pwff:job:a:round:1:update:1:0", b"x")
    store.set_add("pwff:job:a:round:1:merged", "0")
    store.put("pwff:job:a:round:10:update:0:0", b"x")
    store.put("pwff:job:b:round:1:update:0:0", b"x")
    assert store.delete_prefix("pwff:job:a:round:1:update:") == 2
    assert not store.exists("pwff:job:a:round:1:update:0:0")
    assert store.exists("pwff:job:a:round:1:merged")
    assert store.exists("pwff:job:a:round:10:update:0:0")
    assert store.exists("pwff:job:b:round:1:update:0:0")
    assert store.delete_prefix("pwff:job:a:round:1:update:") == 0


def test_batch_applies_nothing_before_execute_and_everything_after(store: MemoryStore) -> None:
    store.put("old", b"gone soon")
    batch = store.batch()
    batch.put("k", b"v")
    batch.delete("old")
    batch.hash_set("h", {"a": "1"})
    batch.list_append("l", b"x")
    batch.set_add("s", "m")
    assert store.get("k") is None and store.get("old") == b"gone soon"
    assert store.hash_get_all("h") == {} and store.list_range("l") == [] and store.set_members("s") == set()
    batch.execute()
    assert store.get("k") == b"v" and store.get("old") is None
    assert store.hash_get_all("h") == {"a": "1"}
    assert store.list_range("l") == [b"x"]
    assert store.set_members("s") == {"m"}


def test_batch_applies_ops_in_order_and_only_once(store: MemoryStore) -> None:
    batch = store.batch()
    batch.put("k", b"first")
    batch.delete("k")
    batch.put("k", b"second")
    batch.list_append("l", b"x")
    batch.execute()
    batch.execute()  # ops were consumed by the first execute
    assert store.get("k") == b"second"
    assert store.list_range("l") == [b"x"]


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


def test_batch_hash_set_captures_the_mapping_when_called(store: MemoryStore) -> None:
    """Like a Redis pipeline, a batch records the values at call time.

    Fails until _MemoryBatch.hash_set copies `mapping` when the op is queued rather than at execute.
    """
    mapping = {"state": "running"}
    batch = store.batch()
    batch.hash_set("h", mapping)
    mapping["state"] = "mutated after queuing"
    batch.execute()
    assert store.hash_get_all("h") == {"state": "running"}


# --- bus --------------------------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The bus's redelivery pauses, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(memory_bus, "time", SimpleNamespace(sleep=recorded.append))
    return recorded


def consume_until(bus: MemoryBus, queue: str, handler: Callable[[bytes], None], done: Callable[[], bool]) -> None:
    """Run the consumer in a thread until `done()` holds (or 5 s pass), then stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=bus.consume, args=(queue, handler, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not done() and time.monotonic() < deadline:
        time.sleep(0.005)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert done(), "consumer did not reach the expected state"


def test_publish_consume_in_order_with_depth() -> None:
    bus = MemoryBus()
    assert bus.ping() and bus.depth(Q) == 0
    for body in (b"1", b"2", bytearray(b"3")):
        bus.publish(Q, body)
    assert bus.depth(Q) == 3
    got: list[bytes] = []
    consume_until(bus, Q, got.append, lambda: len(got) == 3)
    assert got == [b"1", b"2", b"3"] and all(isinstance(b, bytes) for b in got)
    assert bus.depth(Q) == 0 and bus.depth(DEAD) == 0


def test_queues_are_independent_and_purge_empties_one() -> None:
    bus = MemoryBus()
    bus.publish("a", b"x")
    bus.publish("a", b"y")
    bus.publish("b", b"z")
    bus.purge("a")
    assert bus.depth("a") == 0 and bus.depth("b") == 1
    bus.purge("never-used")


def test_invalid_message_is_dead_lettered_at_once_and_the_queue_goes_on(sleeps: list[float]) -> None:
    hook: list[tuple[str, str]] = []
    bus = MemoryBus(on_dead_letter=lambda queue, reason: hook.append((queue, reason)))
    calls: list[bytes] = []
    handled: list[bytes] = []

    def handler(body: bytes) -> None:
        calls.append(body)
        if body == b"bad":
            raise InvalidMessage("not a task")
        handled.append(body)

    for body in (b"bad", b"good"):
        bus.publish(Q, body)
    consume_until(bus, Q, handler, lambda: handled == [b"good"])
    assert calls == [b"bad", b"good"]  # the bad one was tried once, never redelivered
    assert bus.depth(DEAD) == 1 and bus.depth(Q) == 0
    assert hook == [(Q, "not a task")]
    assert sleeps == []
    dead: list[bytes] = []
    consume_until(bus, DEAD, dead.append, lambda: dead == [b"bad"])


def test_transient_failure_is_redelivered_until_it_succeeds(sleeps: list[float]) -> None:
    hook: list[tuple[str, str]] = []
    bus = MemoryBus(on_dead_letter=lambda queue, reason: hook.append((queue, reason)))
    attempts: list[bytes] = []
    done: list[bytes] = []

    def handler(body: bytes) -> None:
        attempts.append(body)
        if body == b"flaky" and attempts.count(b"flaky") < 3:
            raise ConnectionError("store away")
        done.append(body)

    bus.publish(Q, b"flaky")
    bus.publish(Q, b"next")
    consume_until(bus, Q, handler, lambda: sorted(done) == [b"flaky", b"next"])
    assert attempts.count(b"flaky") == 3 and attempts.count(b"next") == 1
    assert bus.depth(DEAD) == 0 and hook == []
    assert len(sleeps) == 2 and sleeps[0] < sleeps[1] <= 2.0  # growing pauses between redeliveries


def test_persistent_failure_is_dead_lettered_after_max_failures(sleeps: list[float]) -> None:
    hook: list[tuple[str, str]] = []
    bus = MemoryBus(on_dead_letter=lambda queue, reason: hook.append((queue, reason)))
    attempts: list[bytes] = []

    def handler(body: bytes) -> None:
        attempts.append(body)
        raise RuntimeError("boom")

    bus.publish(Q, b"poison")
    consume_until(bus, Q, handler, lambda: bus.depth(DEAD) == 1)
    assert attempts == [b"poison"] * MAX_FAILURES
    assert len(sleeps) == MAX_FAILURES - 1
    assert bus.depth(Q) == 0
    assert len(hook) == 1 and hook[0][0] == Q and f"failed {MAX_FAILURES} times: boom" in hook[0][1]


@pytest.mark.parametrize(
    "first_outcomes",
    [["fail"] * MAX_FAILURES, ["fail"] * (MAX_FAILURES - 1) + ["ok"]],
    ids=["after-dead-letter", "after-success"],
)
def test_failure_count_starts_afresh_for_a_new_message(sleeps: list[float], first_outcomes: list[str]) -> None:
    """An identical body published again (a resent CloseRound, a re-announced update) gets its own retries.

    Fails until MemoryBus.consume forgets `failures[body]` once a message is acked or dead-lettered
    (RabbitBus forgets it on dead-letter only, so "after-success" applies to it too).
    """
    bus = MemoryBus()
    # What the handler does on each call, in order: the first message, then one blip on the second.
    script = [*first_outcomes, "fail", "ok"]
    calls: list[str] = []

    def handler(body: bytes) -> None:
        outcome = script[len(calls)] if len(calls) < len(script) else "ok"
        calls.append(outcome)
        if outcome == "fail":
            raise RuntimeError("transient")

    def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)

    # One consumer throughout: the failure counts live as long as the consume loop.
    stop = threading.Event()
    thread = threading.Thread(target=bus.consume, args=(Q, handler, stop), daemon=True)
    thread.start()
    try:
        dead_before = 1 if first_outcomes[-1] == "fail" else 0
        bus.publish(Q, b"same")
        wait_for(lambda: len(calls) == len(first_outcomes) and bus.depth(DEAD) == dead_before)
        assert len(calls) == len(first_outcomes) and bus.depth(DEAD) == dead_before
        bus.publish(Q, b"same")
        wait_for(lambda: len(calls) == len(script) or bus.depth(DEAD) > dead_before)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert bus.depth(DEAD) == dead_before, "a single transient failure dead-lettered a new message"
    assert calls == script
