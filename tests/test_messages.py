"""Bus messages: versioned msgpack maps; anything that does not validate is InvalidMessage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from pydantic import BaseModel

from shared.messages import (
    CloseRound,
    DropJob,
    InitJob,
    InvalidMessage,
    JobFailed,
    JobInitialized,
    RoundCommitted,
    TrainTask,
    UpdateMerged,
    UpdateReady,
    decode_aggregator,
    decode_scheduler,
    decode_task,
    encode,
)

JOB = "tiny-0123456789"

Decoder = Callable[..., Any]

CASES: list[tuple[BaseModel, Decoder]] = [
    (TrainTask(job_id=JOB, round=3, client=2, attempt=1, local_steps=10), decode_task),
    (
        UpdateReady(
            job_id=JOB,
            round=1,
            client=0,
            attempt=0,
            key=f"pwff:job:{JOB}:round:1:update:0:0",
            num_samples=12,
            train_loss=1.25,
            compute_s=0.5,
            upload_bytes=2048,
        ),
        decode_aggregator,
    ),
    (InitJob(job_id=JOB), decode_aggregator),
    (CloseRound(job_id=JOB, round=4), decode_aggregator),
    (DropJob(job_id=JOB), decode_aggregator),
    (JobInitialized(job_id=JOB, metrics={"accuracy": 0.25, "loss": 1.5}), decode_scheduler),
    (UpdateMerged(job_id=JOB, round=2, client=5, merged_count=3), decode_scheduler),
    (RoundCommitted(job_id=JOB, round=2, clients=[0, 3], metrics={"accuracy": 0.5}), decode_scheduler),
    (JobFailed(job_id=JOB, error="boom"), decode_scheduler),
    (TrainTask(job_id=JOB, round=3, client=2, clients=[2, 7, 5], local_steps=10), decode_task),
]


def _ids() -> list[str]:
    return [type(message).__name__ for message, _ in CASES]


def _raw(data: Any) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


@pytest.mark.parametrize(("message", "decode"), CASES, ids=_ids())
def test_round_trip(message: BaseModel, decode: Decoder) -> None:
    body = encode(message)
    decoded = decode(body)
    assert type(decoded) is type(message)
    assert decoded == message
    assert encode(decoded) == body


@pytest.mark.parametrize(("message", "decode"), CASES, ids=_ids())
def test_wire_format_is_a_versioned_map(message: BaseModel, decode: Decoder) -> None:
    data = msgpack.unpackb(encode(message))
    assert isinstance(data, dict)
    assert data["v"] == 1 and data["type"] == message.model_dump()["type"]


@pytest.mark.parametrize(("message", "decode"), CASES, ids=_ids())
@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_schema_version_is_invalid(message: BaseModel, decode: Decoder, version: Any) -> None:
    data = msgpack.unpackb(encode(message))
    data["v"] = version
    with pytest.raises(InvalidMessage, match="schema version"):
        decode(_raw(data))


def test_missing_version_is_invalid() -> None:
    data = msgpack.unpackb(encode(InitJob(job_id=JOB)))
    del data["v"]
    with pytest.raises(InvalidMessage, match="schema version"):
        decode_aggregator(_raw(data))


@pytest.mark.parametrize(("message", "decode"), CASES, ids=_ids())
def test_extra_field_is_invalid(message: BaseModel, decode: Decoder) -> None:
    data = {**msgpack.unpackb(encode(message)), "sneaky": 1}
    with pytest.raises(InvalidMessage, match="sneaky"):
        decode(_raw(data))


@pytest.mark.parametrize("decode", [decode_aggregator, decode_scheduler])
def test_unknown_type_is_invalid(decode: Decoder) -> None:
    with pytest.raises(InvalidMessage):
        decode(_raw({"v": 1, "type": "explode", "job_id": JOB}))


def test_message_on_the_wrong_queue_is_invalid() -> None:
    # Each decoder accepts only its own queue's types.
    with pytest.raises(InvalidMessage):
        decode_task(encode(InitJob(job_id=JOB)))
    with pytest.raises(InvalidMessage):
        decode_aggregator(encode(TrainTask(job_id=JOB, round=1, client=0, local_steps=1)))
    with pytest.raises(InvalidMessage):
        decode_scheduler(encode(CloseRound(job_id=JOB, round=1)))


@pytest.mark.parametrize("decode", [decode_task, decode_aggregator, decode_scheduler])
@pytest.mark.parametrize(
    "body", [_raw([1, 2, 3]), _raw("train"), _raw(7), _raw(None)], ids=["list", "str", "int", "nil"]
)
def test_non_map_msgpack_is_invalid(decode: Decoder, body: bytes) -> None:
    with pytest.raises(InvalidMessage, match="expected a msgpack map"):
        decode(body)


@pytest.mark.parametrize("decode", [decode_task, decode_aggregator, decode_scheduler])
@pytest.mark.parametrize(
    "body", [b"", b"\xc1", b"\x85\xa1v", b"{not msgpack}"], ids=["empty", "reserved", "cut", "json"]
)
def test_garbage_bytes_are_invalid(decode: Decoder, body: bytes) -> None:
    with pytest.raises(InvalidMessage):
        decode(body)


def test_binary_and_ext_values_are_refused() -> None:
    with pytest.raises(InvalidMessage):
        decode_aggregator(_raw({"v": 1, "type": "init", "job_id": JOB, "blob": b"\x00" * 10}))
    with pytest.raises(InvalidMessage):
        decode_aggregator(msgpack.packb({"v": 1, "type": "init", "job_id": msgpack.ExtType(1, b"x")}))


def test_non_string_map_keys_are_refused() -> None:
    with pytest.raises(InvalidMessage):
        decode_aggregator(_raw({1: 1, "v": 1, "type": "init", "job_id": JOB}))


def test_oversized_message_is_invalid() -> None:
    body = encode(JobFailed(job_id=JOB, error="x" * 3000))
    assert decode_scheduler(body, max_bytes=len(body)).error == "x" * 3000
    with pytest.raises(InvalidMessage, match="exceeds the limit"):
        decode_scheduler(body, max_bytes=len(body) - 1)
    with pytest.raises(InvalidMessage, match="exceeds the limit"):
        decode_aggregator(b"\x80" + b"\x00" * (64 * 1024))


@pytest.mark.parametrize(
    "fields",
    [
        {"job_id": "UPPER-case-id"},
        {"job_id": "ab"},
        {"job_id": "-leading-dash"},
        {"job_id": "x" * 65},
        {"round": -1},
        {"client": -3},
        {"attempt": 1001},
        {"local_steps": 0},
        {"local_steps": 1_000_001},
        {"round": "one"},
    ],
)
def test_task_field_bounds(fields: dict[str, Any]) -> None:
    data = msgpack.unpackb(encode(TrainTask(job_id=JOB, round=1, client=0, local_steps=1)))
    data.update(fields)
    with pytest.raises(InvalidMessage):
        decode_task(_raw(data))


def test_update_missing_a_field_is_invalid() -> None:
    data = msgpack.unpackb(encode(CASES[1][0]))
    del data["num_samples"]
    with pytest.raises(InvalidMessage, match="num_samples"):
        decode_aggregator(_raw(data))


def test_update_needs_positive_samples_and_nonnegative_sizes() -> None:
    for field, value in (("num_samples", 0), ("compute_s", -1.0), ("upload_bytes", -1), ("key", "")):
        data = {**msgpack.unpackb(encode(CASES[1][0])), field: value}
        with pytest.raises(InvalidMessage, match=field):
            decode_aggregator(_raw(data))


def test_invalid_message_error_is_single_line_and_bounded() -> None:
    data = {"v": 1, "type": "update", **{f"extra{i}": "y" * 50 for i in range(100)}}
    with pytest.raises(InvalidMessage) as caught:
        decode_aggregator(_raw(data))
    text = str(caught.value)
    assert "\n" not in text and len(text) <= 1000


def test_a_single_client_task_is_on_the_wire_as_before_batches() -> None:
    """No `clients` key unless it is a batch: a worker of an earlier version (unknown fields are refused)
    reads it, and a bound task's signature covers the same fields as before."""
    data = msgpack.unpackb(encode(TrainTask(job_id=JOB, round=1, client=4, local_steps=1)))
    assert "clients" not in data
    assert decode_task(_raw(data)) == TrainTask(job_id=JOB, round=1, client=4, local_steps=1)
    batch = TrainTask(job_id=JOB, round=1, client=4, clients=[4, 1], local_steps=1)
    assert msgpack.unpackb(encode(batch))["clients"] == [4, 1]
    assert batch.batch == [4, 1] and batch.for_client(1) == TrainTask(job_id=JOB, round=1, client=1, local_steps=1)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"client": 3, "clients": [1, 3]}, "start with its client 3"),
        ({"client": 1, "clients": [1, 2, 1]}, "names a client twice"),
        ({"client": 1, "clients": [1, 2], "signature": "ab" * 32}, "pool clients only"),
        ({"client": 0, "clients": list(range(1001))}, "clients"),
        ({"client": 0, "clients": [0, -1]}, "clients"),
    ],
)
def test_a_malformed_batch_is_invalid(fields: dict[str, Any], error: str) -> None:
    data = {**msgpack.unpackb(encode(TrainTask(job_id=JOB, round=1, client=0, local_steps=1))), **fields}
    with pytest.raises(InvalidMessage, match=error):
        decode_task(_raw(data), max_bytes=1 << 20)
