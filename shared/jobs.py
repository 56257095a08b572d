"""The job record in the store, as every service reads it. Only the scheduler writes it."""

from __future__ import annotations

import json
from enum import StrEnum

from shared.spec import JobSpec
from shared.store import Keys, Store


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobNotFound(KeyError):
    pass


def read_spec(store: Store, keys: Keys, job_id: str) -> JobSpec:
    raw = store.hash_get(keys.job(job_id), "spec")
    if raw is None:
        raise JobNotFound(job_id)
    return JobSpec.model_validate(json.loads(raw))


def read_state(store: Store, keys: Keys, job_id: str) -> JobState | None:
    raw = store.hash_get(keys.job(job_id), "state")
    return JobState(raw) if raw else None
