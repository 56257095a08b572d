"""A bound client's personal tensors and residuals in its state directory (shared.client_state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.worker import BoundClient, Worker
from shared import identity
from shared.bus.memory import MemoryBus
from shared.client_state import ClientStateDir
from shared.codec import decode_tensors, encode_tensors
from shared.store.memory import MemoryStore
from tests.bound import enroll_clients


def _blob(value: float) -> bytes:
    return encode_tensors({"head.weight": torch.full((3, 2), value) / 3, "head.bias": torch.arange(3.0)}, "float32")


def test_versions_are_kept_as_safetensors_and_read_back_bit_exact(tmp_path: Path) -> None:
    state = ClientStateDir(tmp_path)
    assert state.latest_personal("job-1", 0, (9, 0)) is None
    for version in [(1, 0), (2, 0), (2, 1)]:
        state.put_personal("job-1", 0, version, _blob(version[0] + version[1]))
    found = state.latest_personal("job-1", 0, (2, 1))  # a redelivered (2, 1) task reads what (2, 0) left
    assert found is not None and found[0] == (2, 0)
    expected = decode_tensors(_blob(2))
    assert all(torch.equal(decode_tensors(found[1])[n], t) for n, t in expected.items())
    folder = tmp_path / "job-1" / "client-0"
    assert sorted(p.name for p in folder.iterdir()) == [
        "personal-1-0.safetensors",
        "personal-2-0.safetensors",
        "personal-2-1.safetensors",
    ]  # no temporary file left behind
    assert state.latest_personal("job-1", 1, (9, 0)) is None  # another client's are its own


def test_residuals_older_than_the_one_read_are_dropped(tmp_path: Path) -> None:
    state = ClientStateDir(tmp_path)
    state.put_residual("job-1", 2, (1, 0), _blob(1), read=None)
    state.put_residual("job-1", 2, (2, 0), _blob(2), read=(1, 0))
    state.put_residual("job-1", 2, (3, 0), _blob(3), read=(2, 0))
    names = sorted(p.name for p in (tmp_path / "job-1" / "client-2").iterdir())
    assert names == ["residual-2-0.safetensors", "residual-3-0.safetensors"]
    found = state.latest_residual("job-1", 2, (3, 0))
    assert found is not None and found[0] == (2, 0)


def test_a_job_id_cannot_name_a_folder_outside_the_state_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a job id"):
        ClientStateDir(tmp_path / "state").put_personal("../../etc", 0, (1, 0), _blob(1))
    assert not (tmp_path / "etc").exists()


def test_a_restarted_bound_worker_reads_its_clients_state_from_the_directory(tmp_path: Path, cache_dir: Path) -> None:
    _, (client, *_) = enroll_clients(tmp_path)
    bound = {client.id: BoundClient(client.data, identity.UpdateSigner.from_file(client.id, client.key))}
    store = MemoryStore()
    first = Worker(MemoryBus(), store, cache_dir=cache_dir, clients=bound, state_dir=tmp_path / "state")
    first.client_tensors.put_personal("job-1", 0, (1, 0), _blob(5))
    restarted = Worker(MemoryBus(), store, cache_dir=cache_dir, clients=bound, state_dir=tmp_path / "state")
    version, personal = restarted._personal_state("job-1", 0, before=(2, 0))
    assert version == "1.0" and torch.equal(personal["head.bias"], torch.arange(3.0))
    assert not store._data  # nothing of it in the platform's store
    # By default under the worker's cache dir; a pool worker keeps its clients' state in the store.
    assert isinstance(Worker(MemoryBus(), store, cache_dir=cache_dir, clients=bound).client_tensors, ClientStateDir)
    pool = Worker(MemoryBus(), store, cache_dir=cache_dir)
    assert pool.client_tensors is pool.state.tensors
