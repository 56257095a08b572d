"""The bus: work queues between the services, with at-least-once delivery.

One interface with two homes: `RabbitBus` (pika, durable queues, publisher confirms,
prefetch 1, a dead-letter queue per queue) and `MemoryBus` for the embedded mode.

A handler returns normally to ack. It raises `InvalidMessage` for a message that can
never succeed: the bus dead-letters it and goes on. Any other exception is treated as
transient: the message is redelivered after a pause, and dead-lettered after
`MAX_FAILURES` failures so a poison message cannot wedge a queue. Both buses take these
rules from one `RetryPolicy` (shared.bus.policy), which their constructors accept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shared.bus.policy import DEFAULT_POLICY, RetryPolicy

Handler = Callable[[bytes], None]
MAX_FAILURES = DEFAULT_POLICY.max_failures


@dataclass(frozen=True)
class ConsumerStatus:
    """What a readiness probe needs to know about one consume loop, read from memory (no broker call).

    `running`: `consume` is executing; `connected`: it holds an open connection to the broker;
    `last_io_s`: monotonic time the loop last exchanged data with the broker (it pumps at least every
    half second, heartbeats included, also while a handler runs), None before the first.
    """

    running: bool = False
    connected: bool = False
    last_io_s: float | None = None


@dataclass(frozen=True)
class Queues:
    namespace: str = "pwff"

    @property
    def tasks(self) -> str:
        """scheduler -> workers: TrainTask."""
        return f"{self.namespace}.tasks"

    @property
    def aggregate(self) -> str:
        """workers and scheduler -> aggregator: UpdateReady, InitJob, CloseRound, DropJob."""
        return f"{self.namespace}.aggregate"

    @property
    def events(self) -> str:
        """aggregator -> scheduler: JobInitialized, UpdateMerged, RoundCommitted, JobFailed."""
        return f"{self.namespace}.events"

    def job_tasks(self, job_id: str) -> str:
        """scheduler -> the workers of a job's own pool (a spec with `resources`; services.scaler runs them)."""
        return f"{self.namespace}.tasks.{job_id}"

    def client_tasks(self, client_id: str) -> str:
        """scheduler -> the worker(s) started for one bound client (`pwff worker --client ID`): only its tasks.

        A queue per identity, so a broker user of that client can be given read access to its own queue only.
        """
        return f"{self.namespace}.client.{client_id}.tasks"

    @property
    def all(self) -> tuple[str, str, str]:
        return (self.tasks, self.aggregate, self.events)

    @staticmethod
    def dead(queue: str) -> str:
        return f"{queue}.dead"


class Bus(Protocol):
    def publish(self, queue: str, body: bytes) -> None: ...
    def consume(self, queue: str, handler: Handler, stop: threading.Event) -> None:
        """Deliver messages to `handler` one at a time until `stop` is set."""
        ...

    def depth(self, queue: str) -> int:
        """Messages ready in `queue` (not counting ones being handled)."""
        ...

    def consumers(self, queue: str) -> int:
        """Consumers attached to `queue` (every process's, as the broker counts them)."""
        ...

    def purge(self, queue: str) -> None: ...
    def ping(self) -> bool: ...
    def consumer_status(self, queue: str) -> ConsumerStatus:
        """The state of this bus's consume loop on `queue` (a default status if it never consumed it)."""
        ...

    def close(self) -> None: ...


DeadLetterHook = Callable[[str, str], None]
"""Called with (queue, reason) whenever a message is dead-lettered; services count them."""


__all__ = [
    "DEFAULT_POLICY",
    "MAX_FAILURES",
    "Bus",
    "ConsumerStatus",
    "DeadLetterHook",
    "Handler",
    "Queues",
    "RetryPolicy",
]
