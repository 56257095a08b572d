"""The bus's retry and dead-letter policy, shared by `MemoryBus` and `RabbitBus`.

A consume loop owns one `FailureTracker` and asks it, after every handler call, what to do
with the message:

- the handler returned: `Ack`;
- it raised `InvalidMessage` (can never succeed): `DeadLetter` at once;
- it raised anything else (transient): `Retry` after an exponential pause, and `DeadLetter`
  once the same body has failed `max_failures` times, so a poison message cannot wedge a queue.

Failures are counted per body, keyed by its SHA-256 (a body may be megabytes; a digest is 32
bytes), and forgotten when the message is acked or dead-lettered, so an identical body
published again later gets its own retries. The tracker also forgets its oldest entries beyond
`max_tracked`, so a stream of bodies that failed once and then went elsewhere (another consumer)
cannot grow it without bound.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from shared.messages import InvalidMessage


@dataclass(frozen=True)
class RetryPolicy:
    max_failures: int = 5
    """Handler failures of one body before it is dead-lettered (the last one included)."""
    base_delay_s: float = 0.2
    """Pause before the first redelivery; each later one doubles it."""
    max_delay_s: float = 5.0
    """Cap on any one pause."""

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("retry delays must not be negative")

    def delay_s(self, failures: int) -> float:
        """The pause before redelivering a message that has failed `failures` times (>= 1)."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** max(failures - 1, 0))


DEFAULT_POLICY = RetryPolicy()


@dataclass(frozen=True)
class Ack:
    """The handler succeeded: acknowledge the message."""


@dataclass(frozen=True)
class DeadLetter:
    """Move the message to the queue's dead-letter queue; `reason` goes to the hook and the log."""

    reason: str


@dataclass(frozen=True)
class Retry:
    """Redeliver the message after `delay_s`; it has failed `failures` times so far."""

    delay_s: float
    failures: int


Decision = Ack | DeadLetter | Retry


class FailureTracker:
    """Failure counts of the messages one consume loop has seen, and the decision for each outcome."""

    def __init__(self, policy: RetryPolicy = DEFAULT_POLICY, max_tracked: int = 10_000) -> None:
        self.policy = policy
        self._max_tracked = max_tracked
        self._failures: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def failures(self, body: bytes) -> int:
        return self._failures.get(hashlib.sha256(body).digest(), 0)

    def decide(self, body: bytes, error: BaseException | None) -> Decision:
        """What to do with `body` after its handler returned (`error` None) or raised `error`."""
        digest = hashlib.sha256(body).digest()
        if error is None:
            self._failures.pop(digest, None)
            return Ack()
        if isinstance(error, InvalidMessage):
            self._failures.pop(digest, None)
            return DeadLetter(str(error))
        failures = self._failures.pop(digest, 0) + 1
        if failures >= self.policy.max_failures:
            return DeadLetter(f"failed {failures} times: {error}")
        self._failures[digest] = failures  # re-inserted last: the most recently seen
        while len(self._failures) > self._max_tracked:
            self._failures.popitem(last=False)
        return Retry(self.policy.delay_s(failures), failures)


__all__ = ["DEFAULT_POLICY", "Ack", "DeadLetter", "Decision", "FailureTracker", "Retry", "RetryPolicy"]
