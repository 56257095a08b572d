"""The store on Redis. Batches are MULTI/EXEC transactions; transient errors are retried."""

from __future__ import annotations

import re
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from shared.store import Batch

_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


def _literal_glob(text: str) -> str:
    """`text` as a SCAN MATCH pattern that matches exactly itself (no wildcards, classes or escapes)."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class RedisStore:
    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=30,
            socket_connect_timeout=10,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=8),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )

    @property
    def client(self) -> redis.Redis:
        return self._client

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def get(self, key: str) -> bytes | None:
        return cast(bytes | None, self._client.get(key))

    def put(self, key: str, value: bytes, ttl_s: int | None = None) -> None:
        self._client.set(key, value, ex=ttl_s or None)

    def put_if_absent(self, key: str, value: bytes, ttl_s: int | None = None) -> bool:
        return bool(self._client.set(key, value, ex=ttl_s or None, nx=True))

    def exists(self, key: str) -> bool:
        return bool(self._client.exists(key))

    def delete(self, *keys: str) -> None:
        if keys:
            self._client.delete(*keys)

    def set_add(self, key: str, member: str) -> bool:
        return bool(self._client.sadd(key, member))

    def set_members(self, key: str) -> set[str]:
        return {m.decode() for m in cast(set[bytes], self._client.smembers(key))}

    def set_remove(self, key: str, member: str) -> bool:
        return bool(self._client.srem(key, member))

    def hash_set(self, key: str, mapping: dict[str, str]) -> None:
        if mapping:  # HSET needs at least one field; an empty mapping writes nothing
            self._client.hset(key, mapping=cast(Any, mapping))

    def hash_get(self, key: str, field: str) -> str | None:
        value = cast(bytes | None, self._client.hget(key, field))
        return value.decode() if value is not None else None

    def hash_get_all(self, key: str) -> dict[str, str]:
        raw = cast(dict[bytes, bytes], self._client.hgetall(key))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def list_append(self, key: str, value: bytes) -> None:
        self._client.rpush(key, value)

    def list_range(self, key: str) -> list[bytes]:
        return cast(list[bytes], self._client.lrange(key, 0, -1))

    def list_trim(self, key: str, keep_last: int) -> None:
        self._client.ltrim(key, -keep_last, -1)

    def delete_prefix(self, prefix: str) -> int:
        count = 0
        for key in self._client.scan_iter(match=_literal_glob(prefix) + "*", count=500):
            count += int(self._client.delete(key))  # 0 if it expired or went meanwhile
        return count

    def expire_prefix(self, prefix: str, ttl_s: int) -> int:
        count = 0
        pipe = self._client.pipeline(transaction=False)
        for key in self._client.scan_iter(match=_literal_glob(prefix) + "*", count=500):
            pipe.expire(key, ttl_s)
            count += 1
            if len(pipe) >= 500:
                pipe.execute()
        pipe.execute()
        return count

    def batch(self) -> Batch:
        return _RedisBatch(self._client.pipeline(transaction=True))

    def close(self) -> None:
        self._client.close()


class _RedisBatch:
    def __init__(self, pipeline: Any) -> None:
        self._pipe = pipeline

    def put(self, key: str, value: bytes, ttl_s: int | None = None) -> None:
        self._pipe.set(key, value, ex=ttl_s or None)

    def delete(self, *keys: str) -> None:
        if keys:
            self._pipe.delete(*keys)

    def hash_set(self, key: str, mapping: dict[str, str]) -> None:
        if mapping:
            self._pipe.hset(key, mapping=mapping)

    def list_append(self, key: str, value: bytes) -> None:
        self._pipe.rpush(key, value)

    def set_add(self, key: str, member: str) -> None:
        self._pipe.sadd(key, member)

    def execute(self) -> None:
        self._pipe.execute()
