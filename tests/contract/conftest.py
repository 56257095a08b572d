"""Fixtures for the contract suite: every test runs against both twins of the store and of the bus.

The in-process twins (MemoryStore, MemoryBus) always run. The real ones (RedisStore, RabbitBus) are
`integration` params that talk to the brokers at `Settings().redis_url` / `Settings().rabbitmq_url`
(PWFF_REDIS_URL, PWFF_RABBITMQ_URL, else the local defaults), the same settings the services and
`tests.harness.ServiceCluster` use. When a broker is down those params fail, never skip: a
green run means both twins were checked. Deselect them with `-m "not integration"`.

Each test gets its own key namespace / queue names and leaves nothing behind.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pytest
import redis

from shared.bus import Bus, DeadLetterHook, Handler, Queues
from shared.bus.memory import MemoryBus
from shared.bus.policy import RetryPolicy
from shared.bus.rabbitmq import RabbitBus
from shared.settings import Settings
from shared.store import Store
from shared.store.memory import MemoryStore
from shared.store.redis import RedisStore

FAST = RetryPolicy(max_failures=3, base_delay_s=0.01, max_delay_s=0.05)
"""The retry policy of the contract buses: the real rules, with pauses short enough for tests."""

WAIT_S = 15.0
"""The longest any condition in this suite is waited for."""


def wait_for(condition: Callable[[], bool], timeout_s: float = WAIT_S, poll_s: float = 0.01) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return condition()
        time.sleep(poll_s)
    return True


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- backends ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis, checked once per session with a fast probe (RedisStore itself retries ~20 s)."""
    url = Settings().redis_url
    problem = ""
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as error:
        problem = str(error)
    finally:
        client.close()
    if problem:
        pytest.fail(
            f'Redis is not reachable at {url} ({problem}); start it (make services) or deselect -m "not integration"',
            pytrace=False,
        )
    return url


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The real RabbitMQ, checked once per session."""
    url = Settings().rabbitmq_url
    params = pika.URLParameters(url)
    params.socket_timeout = 3
    params.connection_attempts = 1
    problem = ""
    try:
        pika.BlockingConnection(params).close()
    except (pika.exceptions.AMQPError, OSError) as error:
        problem = repr(error)
    if problem:
        pytest.fail(
            f"RabbitMQ is not reachable at {url} ({problem}); "
            'start it (make services) or deselect -m "not integration"',
            pytrace=False,
        )
    return url


# --- store ------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def key_namespace() -> str:
    """A prefix no other test (or run) uses; every key a contract test writes starts with it."""
    return _unique("contract") + ":"


@pytest.fixture
def key(key_namespace: str) -> Callable[[str], str]:
    """`key(name)`: `name` inside this test's namespace."""
    return lambda name: key_namespace + name


@pytest.fixture
def store(store_kind: str, key_namespace: str, request: pytest.FixtureRequest) -> Iterator[Store]:
    if store_kind == "memory":
        yield MemoryStore()
        return
    real = RedisStore(request.getfixturevalue("redis_url"))
    try:
        yield real
    finally:
        real.delete_prefix(key_namespace)
        real.close()


# --- bus --------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.integration)])
def bus_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_queue(bus_kind: str, request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """`new_queue()`: a queue name of this test's own; RabbitMQ queues (and dead ones) are deleted after."""
    made: list[str] = []
    url = request.getfixturevalue("rabbitmq_url") if bus_kind == "rabbitmq" else ""

    def make() -> str:
        name = _unique("contract") + ".q"
        made.append(name)
        return name

    yield make
    if bus_kind == "rabbitmq" and made:
        cleaner = RabbitBus(url)
        try:
            cleaner.delete_queues(*made)
        finally:
            cleaner.close()


@pytest.fixture
def queue(new_queue: Callable[[], str]) -> str:
    return new_queue()


@pytest.fixture
def make_bus(bus_kind: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Bus]]:
    """`make_bus(on_dead_letter=None, policy=FAST)`: a bus of this param's kind, closed after the test."""
    made: list[Bus] = []
    url = request.getfixturevalue("rabbitmq_url") if bus_kind == "rabbitmq" else ""

    def make(on_dead_letter: DeadLetterHook | None = None, policy: RetryPolicy = FAST) -> Bus:
        bus: Bus
        if bus_kind == "memory":
            bus = MemoryBus(on_dead_letter=on_dead_letter, policy=policy)
        else:
            bus = RabbitBus(url, on_dead_letter=on_dead_letter, policy=policy)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.close()


@pytest.fixture
def dead_letters() -> list[tuple[str, str]]:
    """What the `bus` fixture's dead-letter hook was called with, in order."""
    return []


@pytest.fixture
def bus(make_bus: Callable[..., Bus], dead_letters: list[tuple[str, str]]) -> Bus:
    def hook(queue: str, reason: str) -> None:
        dead_letters.append((queue, reason))

    return make_bus(on_dead_letter=hook)


class Consumer:
    """`bus.consume(queue, handler, stop)` on a thread, stopped (and checked stopped) on exit."""

    def __init__(self, bus: Bus, queue: str, handler: Handler) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

        def run() -> None:
            try:
                bus.consume(queue, handler, self.stop)
            except BaseException as error:
                self.errors.append(error)

        self.thread = threading.Thread(target=run, name=f"consume-{queue}", daemon=True)

    def __enter__(self) -> Consumer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive(), "the consumer did not stop"
        assert self.errors == [], f"the consumer raised: {self.errors}"


__all__ = ["FAST", "WAIT_S", "Consumer", "Queues", "wait_for"]
