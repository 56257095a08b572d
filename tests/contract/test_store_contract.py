"""The store contract: what the services rely on, checked on MemoryStore and on a real Redis alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from shared.store import Store

from .conftest import wait_for

pytestmark = pytest.mark.timeout(60)

Key = Callable[[str], str]
WRONG_TYPE = (TypeError, redis.ResponseError)  # MemoryStore's WrongType, Redis's WRONGTYPE


def test_ping(store: Store) -> None:
    assert store.ping() is True


def test_put_get_exists_delete(store: Store, key: Key) -> None:
    k = key("k")
    assert store.get(k) is None and not store.exists(k)
    store.put(k, bytearray(b"v1"))  # type: ignore[arg-type]  # any bytes-like value
    value = store.get(k)
    assert value == b"v1" and isinstance(value, bytes)
    store.put(k, b"v2")
    assert store.get(k) == b"v2" and store.exists(k)
    store.put(k, b"")
    assert store.get(k) == b"" and store.exists(k)  # an empty value is a value


def test_delete_several_keys_at_once(store: Store, key: Key) -> None:
    store.put(key("a"), b"1")
    store.hash_set(key("h"), {"f": "1"})
    store.set_add(key("s"), "m")
    store.list_append(key("l"), b"x")
    store.put(key("kept"), b"1")
    store.delete(key("a"), key("h"), key("s"), key("l"), key("never-there"))
    for name in ("a", "h", "s", "l"):
        assert not store.exists(key(name))
    assert store.exists(key("kept"))
    store.delete()  # no keys: no error


def test_missing_keys_read_as_empty(store: Store, key: Key) -> None:
    missing = key("missing")
    assert store.get(missing) is None
    assert store.exists(missing) is False
    assert store.set_members(missing) == set()
    assert store.hash_get(missing, "f") is None
    assert store.hash_get_all(missing) == {}
    assert store.list_range(missing) == []
    assert store.delete_prefix(key("missing")) == 0


def test_list_trim_keeps_the_last_items(store: Store, key: Key) -> None:
    k = key("log")
    for value in (b"a", b"b", b"c", b"d"):
        store.list_append(k, value)
    store.list_trim(k, 5)  # shorter than the bound: unchanged
    assert store.list_range(k) == [b"a", b"b", b"c", b"d"]
    store.list_trim(k, 2)
    assert store.list_range(k) == [b"c", b"d"]
    store.list_trim(key("missing"), 2)  # nothing there: no error, nothing created
    assert not store.exists(key("missing"))


def test_put_if_absent(store: Store, key: Key) -> None:
    k = key("lock")
    assert store.put_if_absent(k, b"first") is True
    assert store.put_if_absent(k, b"second") is False
    assert store.get(k) == b"first"
    store.delete(k)
    assert store.put_if_absent(k, b"third") is True
    assert store.get(k) == b"third"
    store.hash_set(key("h"), {"f": "1"})
    assert store.put_if_absent(key("h"), b"x") is False  # any kind of value makes a key present


def test_ttl_expiry(store: Store, key: Key) -> None:
    """Every TTL behaviour in one test, so the suite waits out a 1 s TTL once per twin."""
    store.put(key("short"), b"x", ttl_s=1)
    store.put(key("forever"), b"y")
    store.put(key("made-persistent"), b"z", ttl_s=1)
    store.put(key("made-persistent"), b"z2")  # like SET: a plain put drops an earlier TTL
    assert store.put_if_absent(key("lock"), b"a", ttl_s=1) is True
    store.put(key("then-set"), b"x", ttl_s=1)
    store.put(key("then-hash"), b"x", ttl_s=1)
    store.put(key("then-list"), b"x", ttl_s=1)
    store.put(key("prefix:expiring"), b"x", ttl_s=1)
    store.put(key("prefix:live"), b"x")
    batch = store.batch()
    batch.put(key("batched"), b"b", ttl_s=1)
    batch.execute()
    started = time.monotonic()
    assert store.get(key("short")) == b"x" and store.exists(key("short"))
    assert store.get(key("batched")) == b"b"
    assert store.put_if_absent(key("lock"), b"b", ttl_s=1) is False

    assert wait_for(lambda: not store.exists(key("short")), timeout_s=5), "a 1 s TTL did not expire"
    assert time.monotonic() - started >= 0.5  # not expired at once either
    assert wait_for(lambda: not store.exists(key("batched")), timeout_s=5)
    assert wait_for(lambda: not store.exists(key("prefix:expiring")), timeout_s=5)
    assert store.get(key("short")) is None
    assert store.get(key("forever")) == b"y"
    assert store.get(key("made-persistent")) == b"z2"
    assert wait_for(lambda: store.put_if_absent(key("lock"), b"c", ttl_s=60), timeout_s=5)
    assert store.get(key("lock")) == b"c"  # an expired key is absent for put_if_absent
    # An expired key is absent for writes of another kind too: they start a fresh value.
    assert wait_for(lambda: not store.exists(key("then-set")), timeout_s=5)
    assert store.set_add(key("then-set"), "m") is True and store.set_members(key("then-set")) == {"m"}
    store.hash_set(key("then-hash"), {"f": "1"})
    assert store.hash_get_all(key("then-hash")) == {"f": "1"}
    store.list_append(key("then-list"), b"i")
    assert store.list_range(key("then-list")) == [b"i"]
    assert store.delete_prefix(key("prefix:")) == 1  # only the live key counts


def test_set_add_returns_whether_the_member_is_new(store: Store, key: Key) -> None:
    s = key("s")
    assert store.set_add(s, "a") is True
    assert store.set_add(s, "a") is False
    assert store.set_add(s, "b") is True
    members = store.set_members(s)
    assert members == {"a", "b"}
    members.add("c")  # a copy: the store is not changed through it
    assert store.set_members(s) == {"a", "b"}
    assert store.exists(s)


def test_hash_set_merges_fields(store: Store, key: Key) -> None:
    h = key("h")
    store.hash_set(h, {"a": "1", "b": "2"})
    store.hash_set(h, {"b": "3", "c": "4"})
    assert store.hash_get_all(h) == {"a": "1", "b": "3", "c": "4"}
    assert store.hash_get(h, "c") == "4"
    assert store.hash_get(h, "zzz") is None
    view = store.hash_get_all(h)
    view["a"] = "changed"  # a copy
    assert store.hash_get(h, "a") == "1"
    store.hash_set(h, {"a": ""})
    assert store.hash_get(h, "a") == ""


def test_hash_set_with_no_fields_writes_nothing(store: Store, key: Key) -> None:
    store.hash_set(key("h"), {})
    assert not store.exists(key("h")) and store.hash_get_all(key("h")) == {}
    store.hash_set(key("h"), {"a": "1"})
    store.hash_set(key("h"), {})
    assert store.hash_get_all(key("h")) == {"a": "1"}
    batch = store.batch()
    batch.hash_set(key("h2"), {})
    batch.execute()
    assert not store.exists(key("h2"))


def test_list_append_keeps_order(store: Store, key: Key) -> None:
    items = [b"one", b"two", b"three", b"", b"two"]
    for item in items:
        store.list_append(key("l"), item)
    assert store.list_range(key("l")) == items
    view = store.list_range(key("l"))
    view.append(b"changed")  # a copy
    assert store.list_range(key("l")) == items


def test_operations_on_a_key_of_another_kind_raise(store: Store, key: Key) -> None:
    """Redis's WRONGTYPE: a key holds one kind of value; only `put` may replace it with bytes."""
    store.put(key("bytes"), b"x")
    store.hash_set(key("hash"), {"f": "1"})
    with pytest.raises(WRONG_TYPE):
        store.get(key("hash"))
    with pytest.raises(WRONG_TYPE):
        store.set_add(key("bytes"), "m")
    with pytest.raises(WRONG_TYPE):
        store.hash_get_all(key("bytes"))
    with pytest.raises(WRONG_TYPE):
        store.list_append(key("hash"), b"x")
    with pytest.raises(WRONG_TYPE):
        store.set_members(key("hash"))
    assert store.get(key("bytes")) == b"x" and store.hash_get_all(key("hash")) == {"f": "1"}
    store.put(key("hash"), b"now bytes")
    assert store.get(key("hash")) == b"now bytes"


def test_delete_prefix_deletes_exactly_the_prefix(store: Store, key: Key) -> None:
    store.put(key("job:a:round:1:update:0:0"), b"x")
    store.put(key("job:a:round:1:update:1:0"), b"x")
    store.hash_set(key("job:a:round:1:update:2:meta"), {"f": "1"})
    store.set_add(key("job:a:round:1:merged"), "0")
    store.put(key("job:a:round:10:update:0:0"), b"x")
    store.put(key("job:b:round:1:update:0:0"), b"x")
    store.put(key("job:a:round:1:update"), b"the prefix without its colon")
    assert store.delete_prefix(key("job:a:round:1:update:")) == 3
    assert not store.exists(key("job:a:round:1:update:0:0"))
    assert not store.exists(key("job:a:round:1:update:2:meta"))
    for kept in ("job:a:round:1:merged", "job:a:round:10:update:0:0", "job:b:round:1:update:0:0"):
        assert store.exists(key(kept)), kept
    assert store.exists(key("job:a:round:1:update"))
    assert store.delete_prefix(key("job:a:round:1:update:")) == 0


@pytest.mark.parametrize("special", ["*", "?", "[b]", "\\"])
def test_delete_prefix_takes_glob_characters_literally(store: Store, key: Key, special: str) -> None:
    """A prefix is text, not a pattern: '*', '?', '[...]' and '\\' in it match only themselves."""
    literal = key(f"a{special}:")
    lookalikes = [key("ab:1"), key("axb:1"), key("a*b:1"), key("a?:1"), key("a\\:1"), key("a[b]:1"), key("ab]:1")]
    for name in lookalikes:
        store.put(name, b"x")
    store.put(literal + "1", b"x")
    store.put(literal + "2", b"x")
    assert store.delete_prefix(literal) == 2
    assert not store.exists(literal + "1") and not store.exists(literal + "2")
    for name in lookalikes:
        if name.startswith(literal):
            continue
        assert store.exists(name), f"delete_prefix({literal!r}) deleted {name!r}"


def test_delete_prefix_of_many_keys(store: Store, key: Key) -> None:
    for i in range(1200):  # more than one SCAN page
        store.put(key(f"many:{i}"), b"x")
    store.put(key("other"), b"x")
    assert store.delete_prefix(key("many:")) == 1200
    assert store.exists(key("other")) and not store.exists(key("many:0"))


def test_expire_prefix_gives_exactly_the_prefix_a_ttl(store: Store, key: Key) -> None:
    store.put(key("job:a:meta"), b"x")
    store.hash_set(key("job:a:round:1:plan"), {"f": "1"})
    store.set_add(key("job:a:round:1:merged"), "0")
    store.list_append(key("job:a:metrics"), b"r")
    store.put(key("job:a:update"), b"x", ttl_s=3600)  # a longer TTL is replaced too
    store.put(key("job:ab:meta"), b"other job")
    assert store.expire_prefix(key("job:a:"), 1) == 5
    assert store.exists(key("job:a:meta"))  # not yet
    assert wait_for(lambda: not store.exists(key("job:a:meta")), timeout_s=5)
    for gone in ("job:a:round:1:plan", "job:a:round:1:merged", "job:a:metrics", "job:a:update"):
        assert not store.exists(key(gone)), gone
    assert store.exists(key("job:ab:meta"))
    assert store.expire_prefix(key("job:a:"), 1) == 0


def test_set_remove(store: Store, key: Key) -> None:
    store.set_add(key("s"), "a")
    store.set_add(key("s"), "b")
    assert store.set_remove(key("s"), "a") is True
    assert store.set_remove(key("s"), "a") is False
    assert store.set_members(key("s")) == {"b"}
    assert store.set_remove(key("s"), "b") is True
    assert not store.exists(key("s"))  # an emptied set is gone, as in Redis
    assert store.set_remove(key("never"), "x") is False


def test_batch_writes_are_invisible_until_execute(store: Store, key: Key) -> None:
    store.put(key("old"), b"gone soon")
    store.hash_set(key("h"), {"kept": "1"})
    batch = store.batch()
    batch.put(key("k"), b"v")
    batch.delete(key("old"))
    batch.hash_set(key("h"), {"a": "1"})
    batch.list_append(key("l"), b"x")
    batch.list_append(key("l"), b"y")
    batch.set_add(key("s"), "m")
    assert store.get(key("k")) is None and store.get(key("old")) == b"gone soon"
    assert store.hash_get_all(key("h")) == {"kept": "1"}
    assert store.list_range(key("l")) == [] and store.set_members(key("s")) == set()
    batch.execute()
    assert store.get(key("k")) == b"v" and store.get(key("old")) is None
    assert store.hash_get_all(key("h")) == {"kept": "1", "a": "1"}
    assert store.list_range(key("l")) == [b"x", b"y"]
    assert store.set_members(key("s")) == {"m"}


def test_batch_applies_ops_in_order_and_only_once(store: Store, key: Key) -> None:
    batch = store.batch()
    batch.put(key("k"), b"first")
    batch.delete(key("k"))
    batch.put(key("k"), b"second")
    batch.list_append(key("l"), b"x")
    batch.delete()  # no keys: no error
    batch.execute()
    batch.execute()  # the first execute consumed the ops
    assert store.get(key("k")) == b"second"
    assert store.list_range(key("l")) == [b"x"]


def test_batch_hash_set_snapshots_its_mapping(store: Store, key: Key) -> None:
    mapping = {"state": "running"}
    batch = store.batch()
    batch.hash_set(key("h"), mapping)
    mapping["state"] = "mutated after queuing"
    mapping["extra"] = "added after queuing"
    batch.execute()
    assert store.hash_get_all(key("h")) == {"state": "running"}


def test_a_failing_write_does_not_stop_the_rest_of_a_batch(store: Store, key: Key) -> None:
    """Like EXEC: each write of the batch is applied; the error of the failing one is raised after."""
    store.put(key("bytes"), b"x")
    batch = store.batch()
    batch.put(key("before"), b"1")
    batch.set_add(key("bytes"), "m")  # wrong kind of key
    batch.put(key("after"), b"2")
    with pytest.raises(WRONG_TYPE):
        batch.execute()
    assert store.get(key("before")) == b"1" and store.get(key("after")) == b"2"
    assert store.get(key("bytes")) == b"x"
