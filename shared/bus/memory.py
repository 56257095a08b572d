"""In-process bus for the embedded mode: one FIFO per queue, same ack/dead-letter rules."""

from __future__ import annotations

import logging
import queue as stdlib_queue
import threading
import time
from collections import defaultdict

from shared.bus import MAX_FAILURES, DeadLetterHook, Handler, Queues
from shared.messages import InvalidMessage

log = logging.getLogger(__name__)


class MemoryBus:
    def __init__(self, on_dead_letter: DeadLetterHook | None = None) -> None:
        self._queues: dict[str, stdlib_queue.Queue[bytes]] = defaultdict(stdlib_queue.Queue)
        self._lock = threading.Lock()
        self._on_dead_letter = on_dead_letter

    def _queue(self, name: str) -> stdlib_queue.Queue[bytes]:
        with self._lock:
            return self._queues[name]

    def publish(self, queue: str, body: bytes) -> None:
        self._queue(queue).put(bytes(body))

    def consume(self, queue: str, handler: Handler, stop: threading.Event) -> None:
        source = self._queue(queue)
        failures: dict[bytes, int] = defaultdict(int)
        while not stop.is_set():
            try:
                body = source.get(timeout=0.1)
            except stdlib_queue.Empty:
                continue
            try:
                handler(body)
                failures.pop(body, None)
            except InvalidMessage as error:
                failures.pop(body, None)
                self._dead_letter(queue, body, str(error))
            except Exception as error:
                failures[body] += 1
                if failures[body] >= MAX_FAILURES:
                    failures.pop(body, None)
                    self._dead_letter(queue, body, f"failed {MAX_FAILURES} times: {error}")
                else:
                    log.exception("handler failed on %s; redelivering", queue)
                    time.sleep(min(2.0, 0.1 * 2 ** failures[body]))
                    source.put(body)

    def _dead_letter(self, queue: str, body: bytes, reason: str) -> None:
        log.warning("dead-lettering a message from %s: %s", queue, reason)
        self._queue(Queues.dead(queue)).put(body)
        if self._on_dead_letter is not None:
            self._on_dead_letter(queue, reason)

    def depth(self, queue: str) -> int:
        return self._queue(queue).qsize()

    def purge(self, queue: str) -> None:
        source = self._queue(queue)
        while True:
            try:
                source.get_nowait()
            except stdlib_queue.Empty:
                return

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass
