"""The per-job pool status record: the scaler writes it, the scheduler's job view reads it.

Kept free of the Kubernetes client so the scheduler can import it without it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from shared.store import Keys, Store

# Outlives a pool's deletion by a day, so a finished job's view still says what was lost.
STATUS_TTL_S = 24 * 3600


class LostPod(BaseModel):
    """A worker pod of the pool that failed, was evicted or had its container killed."""

    name: str = Field(description="the pod's name")
    reason: str = Field(description="Evicted, OOMKilled, Error, ... (the pod's or its container's reason)")
    message: str = Field("", description="what Kubernetes said about it")


class PoolStatus(BaseModel):
    """A job's own worker pool as the scaler last saw it."""

    deployment: str = Field(description="the pool's Deployment")
    replicas: int = Field(description="replicas the scaler asked for (0 once the job ended)")
    ready: int = Field(0, description="ready worker pods")
    lost_pods: list[LostPod] = Field(default_factory=list, description="pods that failed or were evicted")
    deleted: bool = Field(False, description="the pool was removed because its job ended")
    updated_at: float = Field(description="Unix time")


def pool_status_key(keys: Keys, job_id: str) -> str:
    return f"{keys.job_prefix(job_id)}pool"


def write_pool_status(store: Store, keys: Keys, job_id: str, status: PoolStatus) -> None:
    store.put(pool_status_key(keys, job_id), status.model_dump_json().encode(), ttl_s=STATUS_TTL_S)


def read_pool_status(store: Store, keys: Keys, job_id: str) -> dict[str, Any] | None:
    raw = store.get(pool_status_key(keys, job_id))
    if raw is None:
        return None
    value: dict[str, Any] = json.loads(raw)
    return value
