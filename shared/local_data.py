"""A bound client's own data: the file its worker was started with, read only inside that worker.

A worker started for clients (`pwff worker --client site-a --data site-a.jsonl`) handles each task
inside `using(sources)`; `shared.data.client_examples` and `client_test_examples` then read a bound
job's client from that file instead of a packaged shard, so every path that trains or evaluates a
client (the worker, every training mode's `evaluate_client`) sees only the local data, and a
process that was not given a client's file (the aggregator, the scheduler, another client's worker)
cannot read it: it gets `LocalDataMissing`.

The sources are a context variable, not a process global: embedded clusters and tests run several
workers in one process, each with its own clients.

The held-out split is drawn from the same file, as the packaged data sets' is (`shared.data`): per
label, the 20% of distinct texts with the smallest hashes. The reader is `shared.coldstart`'s
JSON-lines/CSV reader of {text, label}; general file formats (CSV, Parquet, `datasets` folders) are
`shared.data`'s business and replace it there.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path

from shared.data import Example, _test_texts
from shared.spec import JobSpec


class LocalDataMissing(RuntimeError):
    """This process holds no data for the bound client asked for (it is not that client's worker)."""


class LocalDataInvalid(ValueError):
    """The client's local file does not fit the job (unreadable, a missing field, a label outside the classes)."""


_SOURCES: ContextVar[Mapping[str, Path] | None] = ContextVar("pwff_local_sources", default=None)


@contextlib.contextmanager
def using(sources: Mapping[str, Path]) -> Iterator[None]:
    """Within the block, bound client `id` reads its examples from `sources[id]` (this thread/context only)."""
    token = _SOURCES.set(dict(sources))
    try:
        yield
    finally:
        _SOURCES.reset(token)


def source_of(spec: JobSpec, client: int) -> Path:
    identity = spec.clients.identity(client)
    if identity is None:
        raise ValueError(f"client {client} of this job is not a bound client")
    sources = _SOURCES.get() or {}
    if identity not in sources:
        raise LocalDataMissing(f"this process holds no data of client {identity!r}: only its own worker reads it")
    return sources[identity]


@functools.lru_cache(maxsize=32)
def _splits(path: Path, mtime_ns: int, spec_json: str) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    from shared.catalog import LocalData
    from shared.coldstart import ColdStartError, read_examples  # torch-heavy; only a bound worker needs it
    from shared.data import DataMismatch, read_local

    spec = JobSpec.model_validate_json(spec_json)
    try:
        if isinstance(spec.dataset, LocalData):
            # The job names its fields and format (shared.data): read this client's file with them.
            examples = read_local(spec.dataset.model_copy(update={"path": str(path)}))
        else:
            examples = read_examples(path, spec)
    except (ColdStartError, DataMismatch) as error:
        raise LocalDataInvalid(f"local data of this client does not fit the job: {error}") from None
    test = _test_texts(examples)
    train = tuple(e for e in examples if e.text not in test)
    if not train:
        raise LocalDataInvalid(f"{path}: no training examples left after the held-out split")
    return train, tuple(e for e in examples if e.text in test)


def _split(spec: JobSpec, client: int) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    path = source_of(spec, client)
    try:
        mtime_ns = path.stat().st_mtime_ns
    except OSError as error:
        raise LocalDataInvalid(f"cannot read {path}: {error.strerror}") from None
    # Keyed by the file's mtime: a data owner who updates the file is read afresh at the next task.
    return _splits(path, mtime_ns, spec.model_dump_json(include={"dataset", "model"}))


def train_examples(spec: JobSpec, client: int) -> list[Example]:
    """The bound client's training examples (its file minus the held-out split)."""
    return list(_split(spec, client)[0])


def test_examples(spec: JobSpec, client: int, limit: int | None = None) -> list[Example]:
    """The bound client's held-out examples, drawn from its own file; at most `limit`."""
    test = _split(spec, client)[1]
    if not test:
        raise LocalDataInvalid("no held-out examples: the client's file needs at least 3 distinct texts of a label")
    return list(test if limit is None else test[:limit])
