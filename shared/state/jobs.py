"""Job records and round plans: written by the scheduler, read by every service."""

from __future__ import annotations

import json
from typing import Any

from shared.spec import JobSpec
from shared.state.records import JobEvent, JobMeta, JobNotFound, JobState, RoundPlan, from_fields, to_fields
from shared.store import Keys, Store


def _checked(kind: type[JobMeta] | type[RoundPlan], fields: dict[str, Any]) -> dict[str, str]:
    unknown = set(fields) - set(kind.model_fields)
    if unknown:
        raise ValueError(f"{kind.__name__} has no fields {sorted(unknown)}")
    return to_fields(fields)


class JobRepository:
    def __init__(self, store: Store, keys: Keys) -> None:
        self.store = store
        self.keys = keys

    # -- jobs -----------------------------------------------------------------------------

    def create(self, meta: JobMeta) -> None:
        batch = self.store.batch()
        batch.hash_set(self.keys.job(meta.id), to_fields(meta.model_dump(mode="json")))
        batch.set_add(self.keys.jobs, meta.id)
        batch.execute()

    MAX_EVENTS = 1000
    """Events kept per job: the latest ones (a long job's round commits would grow without bound)."""

    def add_event(self, job_id: str, event: JobEvent) -> None:
        key = self.keys.events(job_id)
        self.store.list_append(key, event.model_dump_json(exclude_none=True).encode())
        self.store.list_trim(key, self.MAX_EVENTS)

    def events(self, job_id: str) -> list[JobEvent]:
        """The job's events, oldest first (the latest MAX_EVENTS)."""
        return [JobEvent.model_validate_json(raw) for raw in self.store.list_range(self.keys.events(job_id))]

    def expire(self, job_id: str, ttl_s: int) -> int:
        """Every key of the job goes in `ttl_s` seconds (Redis expires them: no service needs to run)."""
        return self.store.expire_prefix(self.keys.job_prefix(job_id), ttl_s)

    def purge(self, job_id: str) -> int:
        """Remove every key of the job (state, rounds, tensors, published models, clients' parts) and its
        entry in the set of jobs; returns how many keys went. All of a job's keys live under its prefix."""
        removed = self.store.delete_prefix(self.keys.job_prefix(job_id))
        self.store.set_remove(self.keys.jobs, job_id)  # a member, not a key: the set stays for the other jobs
        return removed

    def ids(self) -> set[str]:
        return self.store.set_members(self.keys.jobs)

    def get(self, job_id: str) -> JobMeta | None:
        raw = self.store.hash_get_all(self.keys.job(job_id))
        return from_fields(JobMeta, raw) if raw else None

    def require(self, job_id: str) -> JobMeta:
        meta = self.get(job_id)
        if meta is None:
            raise JobNotFound(job_id)
        return meta

    def spec(self, job_id: str) -> JobSpec:
        raw = self.store.hash_get(self.keys.job(job_id), "spec")
        if raw is None:
            raise JobNotFound(job_id)
        return JobSpec.model_validate(json.loads(raw))

    def state(self, job_id: str) -> JobState | None:
        raw = self.store.hash_get(self.keys.job(job_id), "state")
        return JobState(raw) if raw else None

    def current_round(self, job_id: str) -> int:
        raw = self.store.hash_get(self.keys.job(job_id), "round")
        return int(json.loads(raw)) if raw else 0

    def update(self, job_id: str, **fields: Any) -> None:
        """Set some fields of the job record (JobMeta's names), leaving the others as they are."""
        self.store.hash_set(self.keys.job(job_id), _checked(JobMeta, fields))

    # -- round plans ----------------------------------------------------------------------

    def plan(self, job_id: str, round_: int) -> RoundPlan | None:
        raw = self.store.hash_get_all(self.keys.round_plan(job_id, round_))
        return from_fields(RoundPlan, raw) if raw else None

    def planned_clients(self, job_id: str, round_: int) -> list[int] | None:
        raw = self.store.hash_get(self.keys.round_plan(job_id, round_), "clients")
        return [int(c) for c in json.loads(raw)] if raw else None

    def save_plan(self, job_id: str, round_: int, plan: RoundPlan) -> None:
        self.store.hash_set(self.keys.round_plan(job_id, round_), to_fields(plan.model_dump(mode="json")))

    def update_plan(self, job_id: str, round_: int, **fields: Any) -> None:
        """Set some fields of a round plan (RoundPlan's names)."""
        self.store.hash_set(self.keys.round_plan(job_id, round_), _checked(RoundPlan, fields))

    # -- client-side evaluations ----------------------------------------------------------

    def client_figures(self, job_id: str, round_: int) -> dict[int, dict[str, Any]]:
        raw = self.store.hash_get_all(self.keys.client_metrics(job_id, round_))
        return {int(client): json.loads(figures) for client, figures in sorted(raw.items(), key=lambda i: int(i[0]))}

    def add_client_figures(self, job_id: str, round_: int, client: int, figures: dict[str, Any]) -> int:
        """Record one client's evaluation; returns how many clients have reported for the round."""
        key = self.keys.client_metrics(job_id, round_)
        self.store.hash_set(key, {str(client): json.dumps(figures)})
        return len(self.store.hash_get_all(key))
