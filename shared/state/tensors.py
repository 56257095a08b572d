"""Tensors between the services: global states, uploads and their announcements, personal states,
published models. Values are codec bytes (see `shared.codec`); callers decode and bound them."""

from __future__ import annotations

from shared.store import Keys, Store

PersonalVersion = tuple[int, int]
"""(round, wave) of the task that left a client's personal state: ordered as tuples."""

DOWNLOAD_DELTA = "download-delta"
"""Artifact name of a round's committed delta, which workers download instead of the whole state."""
DOWNLOAD_RESIDUAL = "download-residual"
"""Artifact name of what a lossy download codec left out of a round's delta (carried into the next)."""


class TensorRepository:
    def __init__(self, store: Store, keys: Keys, update_ttl_s: int | None = None) -> None:
        self.store = store
        self.keys = keys
        self.update_ttl_s = update_ttl_s

    def global_state(self, job_id: str, round_: int) -> bytes | None:
        """The global trainable state committed at `round_` (0: the initial state)."""
        return self.store.get(self.keys.global_state(job_id, round_))

    def artifact(self, job_id: str, name: str, round_: int) -> bytes | None:
        return self.store.get(self.keys.artifact(job_id, name, round_))

    # -- uploads ----------------------------------------------------------------------------

    def update_key(self, job_id: str, round_: int, client: int, wave: int, attempt: int) -> str:
        return self.keys.update(job_id, round_, client, wave, attempt)

    def put_update(self, key: str, blob: bytes) -> None:
        self.store.put(key, blob, self.update_ttl_s)

    def update(self, key: str) -> bytes | None:
        return self.store.get(key)

    def drop_update(self, key: str) -> None:
        self.store.delete(key)

    def announcement(self, job_id: str, round_: int, client: int, wave: int) -> bytes | None:
        """The UpdateReady message stored for a task, if its update was uploaded."""
        return self.store.get(self.keys.update_meta(job_id, round_, client, wave))

    def put_announcement(self, job_id: str, round_: int, client: int, wave: int, message: bytes) -> None:
        self.store.put(self.keys.update_meta(job_id, round_, client, wave), message, self.update_ttl_s)

    # -- a client's personal state ------------------------------------------------------------

    def latest_personal(
        self, job_id: str, client: int, before: PersonalVersion
    ) -> tuple[PersonalVersion, bytes] | None:
        """The client's personal state as its latest task before `before` left it."""
        members = self.store.set_members(self.keys.personal_rounds(job_id, client))
        versions = [(int(r), int(w)) for r, w in (m.split(":") for m in members)]
        earlier = [v for v in versions if v < before]
        if not earlier:
            return None
        latest = max(earlier)
        blob = self.store.get(self.keys.personal_state(job_id, client, *latest))
        if blob is None:
            raise RuntimeError(f"personal state {latest} of client {client} in {job_id} is gone")
        return latest, blob

    def put_personal(self, job_id: str, client: int, version: PersonalVersion, blob: bytes) -> None:
        # Written under its own version, so a redelivered task still reads the state it started from.
        self.store.put(self.keys.personal_state(job_id, client, *version), blob, self.update_ttl_s)
        self.store.set_add(self.keys.personal_rounds(job_id, client), f"{version[0]}:{version[1]}")

    # -- per-round downloads ---------------------------------------------------------------------

    def download_delta(self, job_id: str, round_: int) -> bytes | None:
        """The delta committed at `round_` (codec bytes): global state `round_ - 1` plus it is state `round_`."""
        return self.store.get(self.keys.artifact(job_id, DOWNLOAD_DELTA, round_))

    # -- a client's codec state (error-feedback residual) ---------------------------------------

    def _residual_key(self, job_id: str, client: int, version: PersonalVersion) -> str:
        return f"{self.keys.job_prefix(job_id)}client:{client}:residual:{version[0]}:{version[1]}"

    def _residual_versions_key(self, job_id: str, client: int) -> str:
        return f"{self.keys.job_prefix(job_id)}client:{client}:residual-rounds"

    def _residual_versions(self, job_id: str, client: int) -> list[PersonalVersion]:
        members = self.store.set_members(self._residual_versions_key(job_id, client))
        return sorted((int(r), int(w)) for r, w in (m.split(":") for m in members))

    def latest_residual(
        self, job_id: str, client: int, before: PersonalVersion
    ) -> tuple[PersonalVersion, bytes] | None:
        """The client's error-feedback residual as its latest task before `before` left it."""
        earlier = [v for v in self._residual_versions(job_id, client) if v < before]
        if not earlier:
            return None
        latest = earlier[-1]
        blob = self.store.get(self._residual_key(job_id, client, latest))
        if blob is None:
            raise RuntimeError(f"residual {latest} of client {client} in {job_id} is gone")
        return latest, blob

    def put_residual(
        self, job_id: str, client: int, version: PersonalVersion, blob: bytes, read: PersonalVersion | None
    ) -> None:
        """Store the residual a task left, under its own version; drop versions older than the one it
        read (`read`), which a redelivered copy of the same task still needs."""
        self.store.put(self._residual_key(job_id, client, version), blob, self.update_ttl_s)
        self.store.set_add(self._residual_versions_key(job_id, client), f"{version[0]}:{version[1]}")
        if read is not None:
            for old in self._residual_versions(job_id, client):
                if old < read:
                    self.store.delete(self._residual_key(job_id, client, old))
        # The version set only grows by one short member per task; its entries point at deleted keys
        # only below `read`, which no later task asks for (they read the latest before their own).

    # -- a client's own secrets (secure aggregation's private keys) -------------------------------

    def client_secret(self, job_id: str, client: int, name: str) -> bytes | None:
        return self.store.get(f"{self.keys.job_prefix(job_id)}client:{client}:secret:{name}")

    def put_client_secret(self, job_id: str, client: int, name: str, blob: bytes) -> None:
        # Client-side state kept in the store only because pwff's clients are simulated by stateless
        # workers; the aggregator never reads these keys.
        self.store.put(f"{self.keys.job_prefix(job_id)}client:{client}:secret:{name}", blob, self.update_ttl_s)

    # -- published models ---------------------------------------------------------------------

    def archive(self, job_id: str, which: str) -> bytes | None:
        """A published PEFT folder (tar.gz): which is 'global' or 'client-<id>'."""
        return self.store.get(self.keys.model_archive(job_id, which))

    def put_archive(self, job_id: str, which: str, blob: bytes) -> None:
        self.store.put(self.keys.model_archive(job_id, which), blob)
