"""Every store key in one place, so the services agree on names and a namespace isolates runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    namespace: str = "pwff"

    @property
    def jobs(self) -> str:
        """Set of all job ids."""
        return f"{self.namespace}:jobs"

    def job_prefix(self, job_id: str) -> str:
        return f"{self.namespace}:job:{job_id}:"

    def job(self, job_id: str) -> str:
        """Hash: the fields of `JobMeta`, JSON-encoded (scheduler-owned)."""
        return f"{self.namespace}:job:{job_id}:meta"

    def events(self, job_id: str) -> str:
        """List: the job's events (JSON), oldest first, bounded (scheduler-owned)."""
        return f"{self.namespace}:job:{job_id}:events"

    def round_plan(self, job_id: str, round_: int) -> str:
        """Hash: the fields of `RoundPlan` (scheduler-owned)."""
        return f"{self.namespace}:job:{job_id}:round:{round_}:plan"

    def round_merged(self, job_id: str, round_: int) -> str:
        """Set of "client:wave" whose update the aggregator merged this round (dedup key)."""
        return f"{self.namespace}:job:{job_id}:round:{round_}:merged"

    def round_rejected(self, job_id: str, round_: int) -> str:
        """Set of "client:wave" whose update the aggregator rejected this round (NaN, malformed, over a bound)."""
        return f"{self.namespace}:job:{job_id}:round:{round_}:rejected"

    def round_committed(self, job_id: str, round_: int) -> str:
        """Committed round record (msgpack): exists iff the round committed."""
        return f"{self.namespace}:job:{job_id}:round:{round_}:committed"

    def update(self, job_id: str, round_: int, client: int, wave: int, attempt: int) -> str:
        return f"{self.namespace}:job:{job_id}:round:{round_}:update:{client}:{wave}:{attempt}"

    def update_meta(self, job_id: str, round_: int, client: int, wave: int) -> str:
        """The UpdateReady message a worker announced for this task (lets the aggregator rebuild)."""
        return f"{self.namespace}:job:{job_id}:round:{round_}:announce:{client}:{wave}"

    def artifact(self, job_id: str, name: str, round_: int) -> str:
        """Tensors a training mode commits beside the global state at `round_` (codec bytes, float32),
        e.g. fwd's "gradient" (guides discriminative sampling) and "momentum" (the server optimizer's)."""
        return f"{self.namespace}:job:{job_id}:{name}:{round_}"

    def global_state(self, job_id: str, round_: int) -> str:
        """Global trainable state committed at `round_` (codec bytes, float32); round 0 is the init."""
        return f"{self.namespace}:job:{job_id}:global:{round_}"

    def metrics(self, job_id: str) -> str:
        """List of per-round metric records (msgpack), round 0 first."""
        return f"{self.namespace}:job:{job_id}:metrics"

    def model_archive(self, job_id: str, which: str) -> str:
        """A published PEFT folder as a tar.gz: which is 'global' or 'client-<id>'."""
        return f"{self.namespace}:job:{job_id}:model:{which}"

    def personal_state(self, job_id: str, client: int, round_: int, wave: int) -> str:
        """A client's personal tensors after its task of (`round_`, `wave`) (codec bytes). Never read by the
        aggregator."""
        return f"{self.namespace}:job:{job_id}:client:{client}:personal:{round_}:{wave}"

    def personal_rounds(self, job_id: str, client: int) -> str:
        """Set of "round:wave" for which `personal_state` exists, so a worker finds the latest before its own."""
        return f"{self.namespace}:job:{job_id}:client:{client}:personal-rounds"

    def client_metrics(self, job_id: str, round_: int) -> str:
        """Hash client -> json of that client's evaluation after `round_` (global vs personalized)."""
        return f"{self.namespace}:job:{job_id}:round:{round_}:client-metrics"
