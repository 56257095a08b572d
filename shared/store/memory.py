"""In-process store for the embedded mode: a dict behind a lock, with Redis's semantics.

As on Redis: a key holds one kind of value (bytes, set, hash or list) and an operation of another
kind on it raises (`WrongType`, Redis's WRONGTYPE); an expired key is absent for every operation;
a batch applies all its writes at once, and a failing write does not stop the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from shared.store import Batch

_T = TypeVar("_T")


class WrongType(TypeError):
    """An operation against a key holding the wrong kind of value (Redis: WRONGTYPE)."""


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._data: dict[str, object] = {}
        self._expiry: dict[str, float] = {}

    def _live(self, key: str) -> object | None:
        deadline = self._expiry.get(key)
        if deadline is not None and time.monotonic() >= deadline:
            self._data.pop(key, None)
            self._expiry.pop(key, None)
        return self._data.get(key)

    def _typed(self, key: str, kind: type[_T]) -> _T | None:
        """The live value at `key` if any, which must be a `kind`."""
        value = self._live(key)
        if value is not None and not isinstance(value, kind):
            raise WrongType(f"{key!r} holds a {type(value).__name__}, not a {kind.__name__}")
        return value

    def _container(self, key: str, kind: type[_T]) -> _T:
        """The live `kind` at `key`, created empty if absent."""
        value = self._typed(key, kind)
        if value is None:
            value = kind()
            self._data[key] = value
        return value

    def ping(self) -> bool:
        return True

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._typed(key, bytes)

    def put(self, key: str, value: bytes, ttl_s: int | None = None) -> None:
        with self._lock:
            self._data[key] = bytes(value)
            if ttl_s:
                self._expiry[key] = time.monotonic() + ttl_s
            else:
                self._expiry.pop(key, None)

    def put_if_absent(self, key: str, value: bytes, ttl_s: int | None = None) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self.put(key, value, ttl_s)
            return True

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._live(key) is not None

    def delete(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._data.pop(key, None)
                self._expiry.pop(key, None)

    def set_add(self, key: str, member: str) -> bool:
        with self._lock:
            members = self._container(key, set)
            added = member not in members
            members.add(member)
            return added

    def set_members(self, key: str) -> set[str]:
        with self._lock:
            return set(self._typed(key, set) or ())

    def set_remove(self, key: str, member: str) -> bool:
        with self._lock:
            members = self._typed(key, set)
            if members is None or member not in members:
                return False
            members.discard(member)
            if not members:  # Redis drops an emptied set
                self.delete(key)
            return True

    def hash_set(self, key: str, mapping: dict[str, str]) -> None:
        with self._lock:
            if not mapping:  # Redis has no empty hash: nothing to write, no key created
                self._typed(key, dict)
                return
            current = self._container(key, dict)
            current.update({k: str(v) for k, v in mapping.items()})

    def hash_get(self, key: str, field: str) -> str | None:
        with self._lock:
            current = self._typed(key, dict)
            return current.get(field) if current is not None else None

    def hash_get_all(self, key: str) -> dict[str, str]:
        with self._lock:
            return dict(self._typed(key, dict) or {})

    def list_append(self, key: str, value: bytes) -> None:
        with self._lock:
            items = self._container(key, list)
            items.append(bytes(value))

    def list_range(self, key: str) -> list[bytes]:
        with self._lock:
            return list(self._typed(key, list) or ())

    def list_trim(self, key: str, keep_last: int) -> None:
        with self._lock:
            items = self._typed(key, list)
            if items is not None and len(items) > keep_last:
                del items[: len(items) - keep_last]

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            doomed = [k for k in list(self._data) if k.startswith(prefix) and self._live(k) is not None]
            self.delete(*doomed)
            return len(doomed)

    def expire_prefix(self, prefix: str, ttl_s: int) -> int:
        with self._lock:
            keys = [k for k in list(self._data) if k.startswith(prefix) and self._live(k) is not None]
            for key in keys:
                self._expiry[key] = time.monotonic() + ttl_s
            return len(keys)

    def batch(self) -> Batch:
        return _MemoryBatch(self)

    def close(self) -> None:
        pass


class _MemoryBatch:
    """Collects writes and applies them under the store's lock, so readers see all or none."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._ops: list[Callable[[], object]] = []

    def put(self, key: str, value: bytes, ttl_s: int | None = None) -> None:
        self._ops.append(lambda: self._store.put(key, value, ttl_s))

    def delete(self, *keys: str) -> None:
        self._ops.append(lambda: self._store.delete(*keys))

    def hash_set(self, key: str, mapping: dict[str, str]) -> None:
        snapshot = dict(mapping)  # as a Redis pipeline would: the value at call time
        self._ops.append(lambda: self._store.hash_set(key, snapshot))

    def list_append(self, key: str, value: bytes) -> None:
        self._ops.append(lambda: self._store.list_append(key, value))

    def set_add(self, key: str, member: str) -> None:
        self._ops.append(lambda: self._store.set_add(key, member))

    def execute(self) -> None:
        """Apply every queued write at once; like Redis EXEC, a failing one does not stop the rest."""
        ops, self._ops = self._ops, []
        first_error: Exception | None = None
        with self._store._lock:
            for op in ops:
                try:
                    op()
                except Exception as error:
                    first_error = first_error or error
        if first_error is not None:
            raise first_error
