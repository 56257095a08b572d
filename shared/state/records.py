"""Typed records of what the services keep in the store about jobs and rounds.

Hash-shaped records (`JobMeta`, `RoundPlan`) are stored one field per hash field, so a writer
can change some fields without reading the others back: strings (and string enums) as they
are, everything else JSON-encoded.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from shared.spec import JobSpec


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class RoundStatus(StrEnum):
    OPEN = "open"
    """Tasks are out; updates are being merged."""
    CLOSING = "closing"
    """The aggregator was asked to commit (or to say it wants another wave)."""
    EVALUATING = "evaluating"
    """The last round committed; every client's evaluation (which publishes its model) is awaited."""
    COMMITTED = "committed"


class JobNotFound(KeyError):
    pass


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


R = TypeVar("R", bound=_Record)


def _plain(value: Any) -> bool:
    return isinstance(value, str)


def to_fields(values: dict[str, Any]) -> dict[str, str]:
    return {name: str(value) if _plain(value) else json.dumps(value) for name, value in values.items()}


def from_fields(kind: type[R], raw: dict[str, str]) -> R:
    data: dict[str, Any] = {}
    for name, value in raw.items():
        field = kind.model_fields.get(name)
        if field is None:
            continue
        annotation = field.annotation
        plain = isinstance(annotation, type) and issubclass(annotation, str)
        data[name] = value if plain else json.loads(value)
    return kind.model_validate(data)


class JobMeta(_Record):
    """The job record (scheduler-owned)."""

    id: str
    spec: JobSpec
    tenant: str = ""
    """The tenant that submitted it (services.scheduler.tenants); only it and admins see the job."""
    state: JobState = JobState.QUEUED
    round: int = 0
    """The round in progress (0 until round 1 opens)."""
    created_at: float
    updated_at: float
    init_sent_at: float = 0.0
    error: str = ""


class RoundPlan(_Record):
    """A round as the scheduler runs it (scheduler-owned; the aggregator reads `clients`)."""

    clients: list[int]
    opened_at: float
    deadline_at: float
    status: RoundStatus = RoundStatus.OPEN
    wave: int = 0
    expected: int
    """Updates asked for so far (every wave's tasks)."""
    close_sent_at: float = 0.0
    force: bool = False
    committed_at: float | None = None
    dispatched: bool = True
    """The round's first tasks (wave 0) were all published; false from the plan's save until then, so a dispatch cut
    short (the broker gone past the publish retries) is done again by the tick. Absent in older plans: true."""


EventKind = Literal["state", "round", "deadline", "client-failed"]


class JobEvent(_Record):
    """One thing that happened to a job, as the scheduler saw it (GET /v1/jobs/{id}/events)."""

    at: float = Field(description="Unix time the scheduler recorded it")
    kind: EventKind = Field(
        description="state: the job changed state; round: a round committed; deadline: a round closed at its "
        "deadline without some of its clients; client-failed: a client's task failed (its reason in message)"
    )
    message: str = Field(max_length=4000, description="what happened, in words")
    state: JobState | None = Field(None, description="state: the new state")
    round: int | None = Field(None, description="the round it concerns")
    client: int | None = Field(None, description="client-failed: the client")


class RoundRecord(_Record):
    """A committed round (aggregator-owned): round 0 is the initial state."""

    round: int
    clients: list[int] = Field(default_factory=list)
    metrics: dict[str, float]
    extra: dict[str, Any] = Field(default_factory=dict)
    """Per-device figures and other structured detail of the round."""
