"""What the aggregator commits per round: merged-update sets, round records, the atomic commit."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgpack

from shared.state.records import RoundRecord
from shared.store import Keys, Store


@dataclass(frozen=True)
class RoundCommit:
    """Everything that becomes visible together when a round commits."""

    record: RoundRecord
    state: bytes
    """The new global state (codec bytes)."""
    artifacts: Mapping[str, bytes] = field(default_factory=dict)
    """The mode's named tensors kept beside the state (codec bytes)."""
    archive: bytes | None = None
    """The published global PEFT folder (tar.gz)."""
    merged: Iterable[tuple[int, int]] = ()
    """(client, wave) of the merged updates, whose announcements the commit retires."""
    prune: Iterable[str] = ()
    """Artifact names to drop two rounds back, with that round's global state."""


class RoundRepository:
    def __init__(self, store: Store, keys: Keys) -> None:
        self.store = store
        self.keys = keys

    # -- merged updates (the dedup set) -----------------------------------------------------

    def merged(self, job_id: str, round_: int) -> list[tuple[int, int]]:
        """(client, wave) of every update merged into the round so far, sorted."""
        members = self.store.set_members(self.keys.round_merged(job_id, round_))
        return sorted((int(client), int(wave)) for client, wave in (m.split(":") for m in members))

    def add_merged(self, job_id: str, round_: int, client: int, wave: int) -> None:
        self.store.set_add(self.keys.round_merged(job_id, round_), f"{client}:{wave}")

    def rejected(self, job_id: str, round_: int) -> list[tuple[int, int]]:
        """(client, wave) of every update rejected this round and not merged since (a retried upload may be)."""
        members = self.store.set_members(self.keys.round_rejected(job_id, round_))
        merged = set(self.merged(job_id, round_))
        return sorted(
            key
            for key in ((int(client), int(wave)) for client, wave in (m.split(":") for m in members))
            if key not in merged
        )

    def add_rejected(self, job_id: str, round_: int, client: int, wave: int) -> None:
        self.store.set_add(self.keys.round_rejected(job_id, round_), f"{client}:{wave}")

    # -- committed rounds -------------------------------------------------------------------

    def is_committed(self, job_id: str, round_: int) -> bool:
        return self.store.exists(self.keys.round_committed(job_id, round_))

    def committed(self, job_id: str, round_: int) -> RoundRecord | None:
        raw = self.store.get(self.keys.round_committed(job_id, round_))
        return RoundRecord.model_validate(msgpack.unpackb(raw)) if raw is not None else None

    def history(self, job_id: str) -> list[RoundRecord]:
        """Every committed round's record, round 0 first."""
        raws = self.store.list_range(self.keys.metrics(job_id))
        return [RoundRecord.model_validate(msgpack.unpackb(raw)) for raw in raws]

    def commit(self, job_id: str, commit: RoundCommit) -> None:
        """One transaction: new state, record, published model, retired announcements, old states."""
        keys, round_ = self.keys, commit.record.round
        packed = msgpack.packb(commit.record.model_dump(mode="json"))
        batch = self.store.batch()
        batch.put(keys.global_state(job_id, round_), commit.state)
        for name, blob in commit.artifacts.items():
            batch.put(keys.artifact(job_id, name, round_), blob)
        batch.put(keys.round_committed(job_id, round_), packed)
        batch.list_append(keys.metrics(job_id), packed)
        if commit.archive is not None:
            batch.put(keys.model_archive(job_id, "global"), commit.archive)
        for client, wave in commit.merged:
            batch.delete(keys.update_meta(job_id, round_, client, wave))
        if round_ >= 2:
            batch.delete(
                keys.global_state(job_id, round_ - 2), *(keys.artifact(job_id, n, round_ - 2) for n in commit.prune)
            )
        batch.execute()
        # Update payloads go after the commit: a crash here leaves garbage (with a TTL), never a gap.
        self.store.delete_prefix(f"{keys.job_prefix(job_id)}round:{round_}:update:")
