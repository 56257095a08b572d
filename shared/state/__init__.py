"""Typed job and round state over the store: every key and conversion lives here.

`JobRepository` holds job records and round plans (the scheduler writes them), `RoundRepository`
what the aggregator commits, `TensorRepository` the tensors that move between services (global
states, updates, personal states, published models). `Repositories` bundles the three over one
store and namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.state.jobs import JobRepository
from shared.state.records import JobEvent, JobMeta, JobNotFound, JobState, RoundPlan, RoundRecord, RoundStatus
from shared.state.rounds import RoundCommit, RoundRepository
from shared.state.tensors import TensorRepository
from shared.store import Keys, Store


@dataclass
class Repositories:
    store: Store
    namespace: str = "pwff"
    update_ttl_s: int | None = None
    keys: Keys = field(init=False)
    jobs: JobRepository = field(init=False)
    rounds: RoundRepository = field(init=False)
    tensors: TensorRepository = field(init=False)

    def __post_init__(self) -> None:
        self.keys = Keys(self.namespace)
        self.jobs = JobRepository(self.store, self.keys)
        self.rounds = RoundRepository(self.store, self.keys)
        self.tensors = TensorRepository(self.store, self.keys, self.update_ttl_s)


__all__ = [
    "JobEvent",
    "JobMeta",
    "JobNotFound",
    "JobRepository",
    "JobState",
    "Repositories",
    "RoundCommit",
    "RoundPlan",
    "RoundRecord",
    "RoundRepository",
    "RoundStatus",
    "TensorRepository",
]
