"""A bound client's state between tasks, kept on its own machine: personal tensors and residuals.

A pool worker keeps every client's personal tensors and error-feedback residual in the platform's
store, so any worker can pick a client up. A bound client's never leave its worker: they live in a
state directory on the client's machine (`--state-dir`, PWFF_CLIENT_STATE_DIR, by default
`<cache_dir>/client-state`), one safetensors file per (round, wave), the versions the store keeps
them under, so a restarted worker, or a redelivered task after a SIGKILL, reads the state its task
started from, exactly as a pool worker reads it from the store.

`ClientStateDir` has the personal/residual half of `shared.state.tensors.TensorRepository`'s
interface (codec blobs in and out), so the worker uses one or the other unchanged. Each file is
written to a temporary name in the same folder, fsynced, and renamed over its final name
(`os.replace`): a worker killed while writing leaves either the whole previous version set or the new
file, never half a file under a version's name.

    <state_dir>/<job_id>/client-<index>/personal-<round>-<wave>.safetensors
    <state_dir>/<job_id>/client-<index>/residual-<round>-<wave>.safetensors
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import safetensors.torch

from shared.codec import decode_tensors, encode_tensors
from shared.messages import JOB_ID_PATTERN
from shared.state.tensors import PersonalVersion

_Kind = Literal["personal", "residual"]
_Found = tuple[PersonalVersion, bytes] | None
"""A version and its codec blob, or None: what `TensorRepository.latest_personal` returns."""
_FILE = re.compile(r"^(personal|residual)-(\d+)-(\d+)\.safetensors$")


class ClientStateDir:
    """Personal tensors and residuals of the bound clients one worker serves, as files in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, job_id: str, client: int) -> Path:
        # The job id comes from a task message: checked so it can only name a folder under root.
        if not re.match(JOB_ID_PATTERN, job_id):
            raise ValueError(f"job id {job_id!r} is not a job id")
        return self.root / job_id / f"client-{int(client)}"

    def _versions(self, job_id: str, client: int, kind: _Kind) -> list[PersonalVersion]:
        folder = self._folder(job_id, client)
        if not folder.is_dir():
            return []
        found = (_FILE.match(entry.name) for entry in folder.iterdir())
        return sorted((int(m[2]), int(m[3])) for m in found if m is not None and m[1] == kind)

    def _path(self, job_id: str, client: int, kind: _Kind, version: PersonalVersion) -> Path:
        return self._folder(job_id, client) / f"{kind}-{version[0]}-{version[1]}.safetensors"

    def _latest(self, job_id: str, client: int, kind: _Kind, before: PersonalVersion) -> _Found:
        earlier = [v for v in self._versions(job_id, client, kind) if v < before]
        if not earlier:
            return None
        latest = earlier[-1]
        tensors = safetensors.torch.load(self._path(job_id, client, kind, latest).read_bytes())
        # float32 both ways (the worker writes float32 blobs): lossless, so a restart changes no bit.
        return latest, encode_tensors(tensors, "float32", zstd_level=1)

    def _put(self, job_id: str, client: int, kind: _Kind, version: PersonalVersion, blob: bytes) -> None:
        path = self._path(job_id, client, kind, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with partial.open("wb") as handle:
            handle.write(safetensors.torch.save(decode_tensors(blob)))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)

    # -- TensorRepository's interface for a client's own state --------------------------------

    def latest_personal(self, job_id: str, client: int, before: PersonalVersion) -> _Found:
        """The client's personal state as its latest task before `before` left it."""
        return self._latest(job_id, client, "personal", before)

    def put_personal(self, job_id: str, client: int, version: PersonalVersion, blob: bytes) -> None:
        # Under its own version, so a redelivered task still reads the state it started from.
        self._put(job_id, client, "personal", version, blob)

    def latest_residual(self, job_id: str, client: int, before: PersonalVersion) -> _Found:
        """The client's error-feedback residual as its latest task before `before` left it."""
        return self._latest(job_id, client, "residual", before)

    def put_residual(
        self, job_id: str, client: int, version: PersonalVersion, blob: bytes, read: PersonalVersion | None
    ) -> None:
        """Store the residual a task left; drop versions older than the one it read (`read`), which a
        redelivered copy of the same task still needs (as the store does)."""
        self._put(job_id, client, "residual", version, blob)
        if read is not None:
            for old in self._versions(job_id, client, "residual"):
                if old < read:
                    self._path(job_id, client, "residual", old).unlink(missing_ok=True)
