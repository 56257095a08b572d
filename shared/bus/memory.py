"""In-process bus for the embedded mode: one FIFO per queue, same ack/dead-letter rules as RabbitBus.

A message is taken off its queue while its handler runs (so `depth` counts it out and no other
consumer gets it) and is gone once the handler returns. A message to redeliver goes back to the
head of its queue, as RabbitMQ requeues a nacked message at its original position.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence

from shared.bus import ConsumerStatus, DeadLetterHook, Handler, Queues
from shared.bus.policy import DEFAULT_POLICY, Ack, DeadLetter, FailureTracker, Retry, RetryPolicy

log = logging.getLogger(__name__)


class _Fifo:
    def __init__(self) -> None:
        self._items: deque[bytes] = deque()
        self._ready = threading.Condition()

    def put(self, body: bytes) -> None:
        with self._ready:
            self._items.append(body)
            self._ready.notify()

    def put_front(self, body: bytes) -> None:
        with self._ready:
            self._items.appendleft(body)
            self._ready.notify()

    def get(self, timeout_s: float) -> bytes | None:
        with self._ready:
            if not self._items:
                self._ready.wait(timeout_s)
            return self._items.popleft() if self._items else None

    def clear(self) -> None:
        with self._ready:
            self._items.clear()

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)


class MemoryBus:
    def __init__(self, on_dead_letter: DeadLetterHook | None = None, policy: RetryPolicy = DEFAULT_POLICY) -> None:
        self._queues: dict[str, _Fifo] = defaultdict(_Fifo)
        self._lock = threading.Lock()
        self._on_dead_letter = on_dead_letter
        self.policy = policy
        self._consumers: dict[str, ConsumerStatus] = {}
        self._consumer_counts: dict[str, int] = defaultdict(int)

    def _queue(self, name: str) -> _Fifo:
        with self._lock:
            return self._queues[name]

    def publish(self, queue: str, body: bytes) -> None:
        self._queue(queue).put(bytes(body))

    def consume(self, queue: str, handler: Handler, stop: threading.Event) -> None:
        # In process there is no broker to lose: the loop is connected while it runs (no I/O to go stale).
        self._consumers[queue] = ConsumerStatus(running=True, connected=True)
        with self._lock:
            self._consumer_counts[queue] += 1
        try:
            self._consume(queue, handler, stop)
        finally:
            self._consumers[queue] = ConsumerStatus()
            with self._lock:
                self._consumer_counts[queue] -= 1

    def _consume(self, queue: str, handler: Handler, stop: threading.Event) -> None:
        source = self._queue(queue)
        tracker = FailureTracker(self.policy)
        while not stop.is_set():
            body = source.get(timeout_s=0.1)
            if body is None:
                continue
            error: Exception | None = None
            try:
                handler(body)
            except Exception as raised:
                error = raised
            except BaseException:
                source.put_front(body)  # the consumer dies with the message unacked: it is redelivered
                raise
            decision = tracker.decide(body, error)
            if isinstance(decision, Ack):
                continue
            if isinstance(decision, DeadLetter):
                self._dead_letter(queue, body, decision.reason)
            elif isinstance(decision, Retry):
                log.error(
                    "handler failed on %s (failure %d of %d); redelivering in %.2fs",
                    queue,
                    decision.failures,
                    self.policy.max_failures,
                    decision.delay_s,
                    exc_info=error,
                )
                time.sleep(decision.delay_s)
                source.put_front(body)

    def _dead_letter(self, queue: str, body: bytes, reason: str) -> None:
        log.warning("dead-lettering a message from %s: %s", queue, reason)
        self._queue(Queues.dead(queue)).put(body)
        if self._on_dead_letter is not None:
            self._on_dead_letter(queue, reason)

    def depth(self, queue: str) -> int:
        return len(self._queue(queue))

    def consumers(self, queue: str) -> int:
        with self._lock:
            return self._consumer_counts.get(queue, 0)

    def consumer_counts(self, queues: Sequence[str]) -> dict[str, int]:
        with self._lock:
            return {queue: self._consumer_counts.get(queue, 0) for queue in queues}

    def purge(self, queue: str) -> None:
        self._queue(queue).clear()

    def ping(self) -> bool:
        return True

    def consumer_status(self, queue: str) -> ConsumerStatus:
        return self._consumers.get(queue, ConsumerStatus())

    def close(self) -> None:
        pass
