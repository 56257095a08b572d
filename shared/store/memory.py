"""In-process store for the embedded mode: a dict behind a lock, with Redis's semantics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from shared.store import Batch


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

    def ping(self) -> bool:
        return True

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._live(key)
            return value if isinstance(value, bytes) else None

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
            members = self._data.setdefault(key, set())
            assert isinstance(members, set)
            added = member not in members
            members.add(member)
            return added

    def set_members(self, key: str) -> set[str]:
        with self._lock:
            members = self._live(key)
            return set(members) if isinstance(members, set) else set()

    def hash_set(self, key: str, mapping: dict[str, str]) -> None:
        with self._lock:
            current = self._data.setdefault(key, {})
            assert isinstance(current, dict)
            current.update({k: str(v) for k, v in mapping.items()})

    def hash_get(self, key: str, field: str) -> str | None:
        with self._lock:
            current = self._live(key)
            return current.get(field) if isinstance(current, dict) else None

    def hash_get_all(self, key: str) -> dict[str, str]:
        with self._lock:
            current = self._live(key)
            return dict(current) if isinstance(current, dict) else {}

    def list_append(self, key: str, value: bytes) -> None:
        with self._lock:
            items = self._data.setdefault(key, [])
            assert isinstance(items, list)
            items.append(bytes(value))

    def list_range(self, key: str) -> list[bytes]:
        with self._lock:
            items = self._live(key)
            return list(items) if isinstance(items, list) else []

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._data if k.startswith(prefix)]
            self.delete(*doomed)
            return len(doomed)

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
        with self._store._lock:
            for op in self._ops:
                op()
        self._ops.clear()
