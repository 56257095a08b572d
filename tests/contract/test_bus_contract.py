"""The bus contract: delivery, ack, redelivery and dead-lettering, on MemoryBus and a real RabbitMQ alike."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pika
import pytest

from shared.bus import Bus, Queues
from shared.bus.policy import RetryPolicy
from shared.bus.rabbitmq import RabbitBus
from shared.messages import InvalidMessage

from .conftest import FAST, WAIT_S, Consumer, wait_for

pytestmark = pytest.mark.timeout(90)

DeadLetters = list[tuple[str, str]]


def test_ping(bus: Bus) -> None:
    assert bus.ping() is True


def test_publish_consume_in_fifo_order(bus: Bus, queue: str) -> None:
    bodies = [f"m{i}".encode() for i in range(10)]
    for body in bodies:
        bus.publish(queue, body)
    got: list[bytes] = []
    with Consumer(bus, queue, got.append):
        assert wait_for(lambda: len(got) == len(bodies))
    assert got == bodies and all(isinstance(b, bytes) for b in got)
    assert bus.depth(queue) == 0 and bus.depth(Queues.dead(queue)) == 0


def test_messages_published_while_consuming_arrive_in_order(bus: Bus, queue: str) -> None:
    got: list[bytes] = []
    with Consumer(bus, queue, got.append):
        for i in range(5):
            bus.publish(queue, f"m{i}".encode())
        bus.publish(queue, bytearray(b"last"))  # type: ignore[arg-type]  # any bytes-like body
        assert wait_for(lambda: len(got) == 6)
    assert got == [b"m0", b"m1", b"m2", b"m3", b"m4", b"last"]


def test_depth_and_purge(bus: Bus, new_queue: Callable[[], str]) -> None:
    a, b = new_queue(), new_queue()
    assert bus.depth(a) == 0
    for body in (b"x", b"y", b"z"):
        bus.publish(a, body)
    bus.publish(b, b"other")
    assert wait_for(lambda: bus.depth(a) == 3 and bus.depth(b) == 1, timeout_s=5)
    bus.purge(a)
    assert bus.depth(a) == 0 and bus.depth(b) == 1  # queues are independent
    bus.purge(new_queue())  # a queue never used: no error
    got: list[bytes] = []
    with Consumer(bus, b, got.append):
        assert wait_for(lambda: got == [b"other"])


def test_a_message_is_acked_only_after_its_handler_returns(bus: Bus, queue: str) -> None:
    """While a handler runs, its message is counted out of `depth` and no other consumer gets it."""
    release = threading.Event()
    first_started = threading.Event()
    calls: list[tuple[str, bytes]] = []

    def slow(body: bytes) -> None:
        calls.append(("slow", body))
        if body == b"held":
            first_started.set()
            release.wait(WAIT_S)

    def other(body: bytes) -> None:
        calls.append(("other", body))

    bus.publish(queue, b"held")
    with Consumer(bus, queue, slow):
        assert first_started.wait(WAIT_S), "the first consumer never got the message"
        with Consumer(bus, queue, other):
            bus.publish(queue, b"next")
            assert wait_for(lambda: ("other", b"next") in calls), "the second consumer got nothing"
            time.sleep(0.5)  # give a wrong redelivery of "held" a chance to show
            assert bus.depth(queue) == 0  # "held" is in flight, not ready
            assert [c for c in calls if c[1] == b"held"] == [("slow", b"held")]
            release.set()
        time.sleep(0.3)
    assert [c for c in calls if c[1] == b"held"] == [("slow", b"held")], "an acked message came back"
    assert bus.depth(queue) == 0


def test_a_transient_failure_is_redelivered_with_the_same_body(bus: Bus, queue: str, dead_letters: DeadLetters) -> None:
    calls: list[bytes] = []

    def flaky(body: bytes) -> None:
        calls.append(body)
        if body == b"flaky" and calls.count(b"flaky") == 1:
            raise ConnectionError("store away")

    bus.publish(queue, b"flaky")
    bus.publish(queue, b"next")
    with Consumer(bus, queue, flaky):
        assert wait_for(lambda: calls.count(b"flaky") == 2 and b"next" in calls)
        time.sleep(0.2)
    # A redelivered message goes back to the head of its queue (RabbitMQ requeues at the original position).
    assert calls == [b"flaky", b"flaky", b"next"]
    assert bus.depth(queue) == 0 and bus.depth(Queues.dead(queue)) == 0 and dead_letters == []


def test_an_invalid_message_is_dead_lettered_at_once(bus: Bus, queue: str, dead_letters: DeadLetters) -> None:
    calls: list[bytes] = []

    def handler(body: bytes) -> None:
        calls.append(body)
        if body == b"bad":
            raise InvalidMessage("not a task")

    bus.publish(queue, b"bad")
    bus.publish(queue, b"good")
    with Consumer(bus, queue, handler):
        assert wait_for(lambda: b"good" in calls)
        assert wait_for(lambda: bus.depth(Queues.dead(queue)) == 1, timeout_s=5)
    assert calls == [b"bad", b"good"]  # tried once, never redelivered, and the queue went on
    assert dead_letters == [(queue, "not a task")]
    assert bus.depth(queue) == 0
    dead: list[bytes] = []
    with Consumer(bus, Queues.dead(queue), dead.append):
        assert wait_for(lambda: dead == [b"bad"])


def test_a_message_that_always_fails_is_dead_lettered_after_max_failures(
    bus: Bus, queue: str, dead_letters: DeadLetters
) -> None:
    calls: list[bytes] = []

    def handler(body: bytes) -> None:
        calls.append(body)
        if body == b"poison":
            raise RuntimeError("boom")

    bus.publish(queue, b"poison")
    bus.publish(queue, b"fine")
    with Consumer(bus, queue, handler):
        assert wait_for(lambda: bus.depth(Queues.dead(queue)) == 1 and b"fine" in calls)
        time.sleep(0.2)
    assert calls == [b"poison"] * FAST.max_failures + [b"fine"]
    assert dead_letters == [(queue, f"failed {FAST.max_failures} times: boom")]
    assert bus.depth(queue) == 0


def test_the_failure_count_starts_afresh_for_a_republished_body(
    bus: Bus, queue: str, dead_letters: DeadLetters
) -> None:
    """An identical body published again (a resent CloseRound) gets its own retries, after an ack or a dead-letter."""
    script = ["fail"] * FAST.max_failures + ["fail"] * (FAST.max_failures - 1) + ["ok"] + ["fail", "ok"]
    calls: list[str] = []

    def handler(body: bytes) -> None:
        outcome = script[len(calls)] if len(calls) < len(script) else "ok"
        calls.append(outcome)
        if outcome == "fail":
            raise RuntimeError("transient")

    with Consumer(bus, queue, handler):
        bus.publish(queue, b"same")  # dead-lettered
        assert wait_for(lambda: len(calls) == FAST.max_failures and len(dead_letters) == 1)
        bus.publish(queue, b"same")  # succeeds on its last try
        assert wait_for(lambda: len(calls) == 2 * FAST.max_failures)
        bus.publish(queue, b"same")  # one blip, then fine
        assert wait_for(lambda: len(calls) == len(script))
        time.sleep(0.2)
    assert calls == script
    assert len(dead_letters) == 1 and bus.depth(Queues.dead(queue)) == 1


def test_retries_wait_the_policys_growing_delay(
    make_bus: Callable[..., Bus], queue: str, dead_letters: DeadLetters
) -> None:
    policy = RetryPolicy(max_failures=3, base_delay_s=0.3, max_delay_s=0.6)
    bus = make_bus(on_dead_letter=lambda q, reason: dead_letters.append((q, reason)), policy=policy)
    stamps: list[float] = []

    def handler(body: bytes) -> None:
        stamps.append(time.monotonic())
        raise RuntimeError("boom")

    bus.publish(queue, b"poison")
    with Consumer(bus, queue, handler):
        assert wait_for(lambda: len(dead_letters) == 1)
    assert len(stamps) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    assert policy.delay_s(1) == pytest.approx(0.3) and policy.delay_s(2) == pytest.approx(0.6)
    assert 0.28 <= gaps[0] < 0.3 + 3.0, gaps
    assert 0.58 <= gaps[1] < 0.6 + 3.0, gaps
    assert dead_letters == [(queue, "failed 3 times: boom")]


# --- RabbitMQ only ----------------------------------------------------------------------------


@pytest.mark.integration
def test_rabbit_redelivers_a_message_whose_consumer_died_before_acking(rabbitmq_url: str) -> None:
    """A consumer whose connection dies mid-handler never acked: the broker gives the message to the next one."""
    queue = f"contract-crash-{time.monotonic_ns()}.q"
    bus = RabbitBus(rabbitmq_url, policy=FAST)
    try:
        bus.publish(queue, b"orphan")
        assert bus.depth(queue) == 1
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        channel = connection.channel()
        method, _properties, body = channel.basic_get(queue, auto_ack=False)
        assert method is not None and body == b"orphan"
        assert bus.depth(queue) == 0  # taken, not acked
        connection.close()  # the "crash": the channel goes without an ack
        got: list[bytes] = []
        with Consumer(bus, queue, got.append):
            assert wait_for(lambda: got == [b"orphan"])
        assert bus.depth(queue) == 0 and bus.depth(Queues.dead(queue)) == 0
    finally:
        bus.delete_queues(queue)
        bus.close()


def test_a_bound_clients_queue_reaches_only_its_worker_and_counts_its_presence(
    bus: Bus, new_queue: Callable[[], str], request: pytest.FixtureRequest
) -> None:
    # Per-client routing: each bound client's tasks go to the queue named by its identity, which
    # only its own worker consumes; the scheduler reads a client's presence from its consumer count.
    queues = Queues(new_queue().removesuffix(".q"))
    a, b = queues.client_tasks("site-a"), queues.client_tasks("site-b")
    for name in (a, b):
        request.addfinalizer(lambda name=name: _delete_if_rabbit(request, bus, name))
    assert len({a, b, queues.tasks, queues.aggregate, queues.events}) == 5
    assert bus.consumers(a) == 0
    bus.publish(a, b"task of a")
    bus.publish(b, b"task of b")
    got: list[bytes] = []
    with Consumer(bus, a, got.append):
        assert wait_for(lambda: got == [b"task of a"] and bus.consumers(a) == 1)
        assert bus.consumers(b) == 0  # site-b has no worker: absent
    assert wait_for(lambda: bus.consumers(a) == 0)
    assert bus.depth(b) == 1 and got == [b"task of a"]  # site-b's task waits for site-b's worker only


def _delete_if_rabbit(request: pytest.FixtureRequest, bus: Bus, queue: str) -> None:
    if isinstance(bus, RabbitBus):
        cleaner = RabbitBus(request.getfixturevalue("rabbitmq_url"))
        try:
            cleaner.delete_queues(queue)
        finally:
            cleaner.close()
