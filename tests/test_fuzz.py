"""Property tests of every decoder that reads bytes from the network or a user (hypothesis).

For each decoder: arbitrary bytes and mutated valid payloads raise nothing but the decoder's own
error (a ValueError subclass: InvalidMessage, CodecError, UploadError, SpecError), never allocate
memory out of proportion (every call runs under an RLIMIT_DATA of what the process already has plus
`HEADROOM`: a header that claims a huge tensor must be refused before anything is allocated), and
valid inputs round-trip. Seeded (`derandomize=True`, no example database) so CI runs the same cases.
Crashes these tests found are kept below as explicit regression examples.
"""

from __future__ import annotations

import json
import math
import resource
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import messages
from shared.codec import (
    MAGIC,
    UPDATE_MAGIC,
    Codec,
    CodecError,
    decode_tensors,
    decode_update,
    encode_tensors,
    encode_update,
)
from shared.forward_grad import (
    POOL_MAGIC,
    TRAJECTORY_MAGIC,
    TrajectoryStep,
    UploadError,
    decode_pool,
    decode_seed_scalars,
    decode_trajectory,
    encode_pool,
    encode_seed_scalars,
    encode_trajectory,
    validate_upload,
)
from shared.spec import JobSpec, SpecError, load_spec_file, parse_spec

HEADROOM = 256 * 1024 * 1024
"""Memory a decoder may allocate in one call: far above any payload here, far below what a forged
header claims (gigabytes to exabytes)."""

FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _vm_data() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


@contextmanager
def bounded_memory(headroom: int = HEADROOM) -> Iterator[None]:
    """An allocation past `headroom` fails (MemoryError or torch's RuntimeError) instead of succeeding."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (_vm_data() + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def only_raises(error: type[Exception], decode: Callable[[], Any]) -> Any:
    """The decoder's result, or None if it raised `error`; anything else fails the test."""
    with bounded_memory():
        try:
            return decode()
        except error:
            return None


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid payload with bytes flipped, cut, inserted or spliced: what a broken or hostile sender makes."""
    n = len(valid)
    flip = st.tuples(st.integers(0, max(0, n - 1)), st.integers(1, 255)).map(
        lambda p: valid[: p[0]] + bytes([valid[p[0]] ^ p[1]]) + valid[p[0] + 1 :] if n else valid
    )
    cut = st.integers(0, n).map(lambda i: valid[:i])
    insert = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=16)).map(
        lambda p: valid[: p[0]] + p[1] + valid[p[0] :]
    )
    splice = st.tuples(st.integers(0, n), st.integers(0, n), st.binary(max_size=32)).map(
        lambda p: valid[: min(p[0], p[1])] + p[2] + valid[max(p[0], p[1]) :]
    )
    return st.one_of(flip, cut, insert, splice)


# -- bus messages (shared/messages.py) ------------------------------------------------------------

DECODERS = [messages.decode_task, messages.decode_aggregator, messages.decode_scheduler]
JOB_IDS = st.from_regex(messages.JOB_ID_PATTERN, fullmatch=True)
SMALL = st.integers(0, 1_000_000)
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)

VALID_MESSAGES: st.SearchStrategy[Any] = st.one_of(
    st.builds(
        messages.TrainTask,
        job_id=JOB_IDS,
        round=SMALL,
        client=SMALL,
        attempt=st.integers(0, 1000),
        wave=st.integers(0, 10_000),
        local_steps=st.integers(1, 1_000_000),
        perturbations=st.integers(0, 100_000),
    ),
    st.builds(messages.EvaluateTask, job_id=JOB_IDS, round=SMALL, client=SMALL, publish=st.booleans()),
    st.builds(
        messages.UpdateReady,
        job_id=JOB_IDS,
        round=SMALL,
        client=SMALL,
        attempt=st.integers(0, 1000),
        key=st.text(min_size=1, max_size=64),
        num_samples=st.integers(1, 1_000_000_000),  # the field's own bounds: valid messages only
        train_loss=FINITE,
        compute_s=st.floats(0, 1e9),
        upload_bytes=st.integers(0, 2**62),
        cosine=st.floats(-1, 1),
    ),
    st.builds(messages.CloseRound, job_id=JOB_IDS, round=SMALL, force=st.booleans()),
    st.builds(messages.DropJob, job_id=JOB_IDS),
    st.builds(messages.InitJob, job_id=JOB_IDS),
    st.builds(
        messages.RoundCommitted,
        job_id=JOB_IDS,
        round=SMALL,
        clients=st.lists(SMALL, max_size=20),
        metrics=st.dictionaries(st.text(max_size=20), FINITE, max_size=8),
    ),
    st.builds(messages.JobFailed, job_id=JOB_IDS, error=st.text(max_size=200)),
    st.builds(messages.UpdateMerged, job_id=JOB_IDS, round=SMALL, client=SMALL, merged_count=st.integers(1, 10**6)),
)


def _decode_any(body: bytes) -> messages.BaseModel | None:
    """What any of the three queues makes of `body` (None: all three refuse it as InvalidMessage)."""
    results = [only_raises(messages.InvalidMessage, lambda d=decode: d(body)) for decode in DECODERS]  # type: ignore[misc]
    accepted = [r for r in results if r is not None]
    return accepted[0] if accepted else None


@FUZZ
@given(st.binary(max_size=512))
def test_messages_arbitrary_bytes_are_invalid_messages(body: bytes) -> None:
    _decode_any(body)


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
MESSAGE_TYPES: list[type[messages.BaseModel]] = [
    *typing.get_args(messages.WorkerTask),
    *typing.get_args(messages.AggregatorCommand),
    *typing.get_args(messages.SchedulerEvent),
]
FIELD_NAMES = sorted({name for model in MESSAGE_TYPES for name in model.model_fields})
TYPES = [model.model_fields["type"].default for model in MESSAGE_TYPES]


@FUZZ
@given(
    st.fixed_dictionaries(
        {"v": st.just(1) | MSGPACK_VALUES, "type": st.sampled_from(TYPES) | MSGPACK_VALUES},
        optional={name: MSGPACK_VALUES | SMALL | JOB_IDS for name in FIELD_NAMES if name not in ("v", "type")},
    )
)
def test_messages_structured_garbage_is_invalid_or_valid(data: dict[str, Any]) -> None:
    """Maps with the right keys and wrong (or right) values: the validation path, not just msgpack's."""
    body = msgpack.packb(data, use_bin_type=True)
    decoded = _decode_any(body)
    if decoded is not None:  # accepted: then it is a message that encodes back to what was read
        assert messages.encode(decoded) == messages.encode(
            type(decoded).model_validate(msgpack.unpackb(messages.encode(decoded)))
        )


@FUZZ
@given(VALID_MESSAGES)
def test_messages_round_trip(message: messages.BaseModel) -> None:
    decoded = _decode_any(messages.encode(message))
    assert decoded == message


@FUZZ
@given(VALID_MESSAGES.flatmap(lambda m: mutations(messages.encode(m))))
def test_messages_mutated_are_invalid_or_valid(body: bytes) -> None:
    _decode_any(body)


def test_messages_over_the_size_limit_are_refused_before_parsing() -> None:
    body = msgpack.packb({"v": 1, "type": "failed", "job_id": "abc", "error": "x" * 100_000})
    with pytest.raises(messages.InvalidMessage, match="exceeds the limit"):
        messages.decode_scheduler(body)
    # A msgpack array header that claims 2**32 - 1 elements in five bytes.
    with bounded_memory(), pytest.raises(messages.InvalidMessage):
        messages.decode_task(b"\xdd\xff\xff\xff\xff")


# -- tensor payloads and updates (shared/codec.py) -------------------------------------------------

CODECS = st.builds(
    Codec,
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    quantize=st.sampled_from(["none", "int8", "int4"]),
    block_size=st.sampled_from([1, 3, 16, 64]),
    rounding=st.sampled_from(["stochastic", "nearest"]),
    topk=st.none() | st.floats(0.05, 1.0),
)
SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
TENSORS = st.dictionaries(
    st.text("abcdefgh.", min_size=1, max_size=8), st.tuples(SHAPES, st.integers(0, 2**31)), min_size=1, max_size=3
).map(
    lambda spec: {
        name: torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1
        for name, (shape, seed) in spec.items()
    }
)


@FUZZ
@given(TENSORS, CODECS, st.integers(0, 2**31))
def test_updates_round_trip(tensors: dict[str, torch.Tensor], codec: Codec, seed: int) -> None:
    encoded = encode_update(tensors, codec, seed, meta={"round": 3, "base": "abc"})
    update = decode_update(encoded.blob, expected=tensors)
    assert update.codec == Codec(codec.dtype, codec.quantize, codec.block_size, codec.rounding, codec.topk)
    assert update.meta == {"round": 3, "base": "abc"}
    assert set(update.tensors) == set(tensors)
    for name, value in update.tensors.items():
        assert torch.equal(value, encoded.decoded[name])
    if codec.lossless:
        assert all(torch.equal(update.tensors[n], tensors[n]) for n in tensors)


@FUZZ
@given(TENSORS, st.sampled_from(["float32", "float16", "bfloat16"]))
def test_dense_payloads_round_trip(tensors: dict[str, torch.Tensor], dtype: str) -> None:
    decoded = decode_tensors(encode_tensors(tensors, dtype))
    assert set(decoded) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(decoded[name], value.to(getattr(torch, dtype)).float())


@FUZZ
@given(st.binary(max_size=512), st.sampled_from([b"", MAGIC, UPDATE_MAGIC]))
def test_tensor_payloads_arbitrary_bytes_are_codec_errors(body: bytes, magic: bytes) -> None:
    only_raises(CodecError, lambda: decode_tensors(magic + body))
    only_raises(CodecError, lambda: decode_update(magic + zstandard.ZstdCompressor().compress(body)))


def _recompressed(blob: bytes) -> tuple[bytes, bytes]:
    magic = blob[:4]
    return magic, zstandard.ZstdDecompressor().decompress(blob[4:])


@FUZZ
@given(
    st.tuples(TENSORS, CODECS, st.integers(0, 2**31)).flatmap(
        lambda args: st.tuples(
            st.just(_recompressed(encode_update(args[0], args[1], args[2]).blob)),
            mutations(_recompressed(encode_update(args[0], args[1], args[2]).blob)[1]),
            st.just(args[0]),
        )
    )
)
def test_mutated_updates_are_codec_errors_or_valid(
    case: tuple[tuple[bytes, bytes], bytes, dict[str, torch.Tensor]],
) -> None:
    """Mutations of the decompressed body (header length, msgpack header, safetensors parts), recompressed:
    the checks behind zstd. Whatever is accepted has the expected names and shapes and finite values."""
    (magic, _), body, tensors = case
    blob = magic + zstandard.ZstdCompressor().compress(body)
    update = only_raises(CodecError, lambda: decode_update(blob, expected=tensors))
    if update is not None:
        assert {n: tuple(t.shape) for n, t in update.tensors.items()} == {n: tuple(t.shape) for n, t in tensors.items()}
        assert all(bool(torch.isfinite(t).all()) for t in update.tensors.values())
    only_raises(CodecError, lambda: decode_update(blob))


HEADER_VALUES = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-(2**63), 2**64 - 1), max_size=9),
)


@FUZZ
@given(
    st.fixed_dictionaries(
        {
            "v": st.just(1) | HEADER_VALUES,
            "codec": st.fixed_dictionaries(
                {},
                optional={
                    "dtype": st.sampled_from(["float32", "float16", "bfloat16", "int8"]) | HEADER_VALUES,
                    "quantize": st.sampled_from(["none", "int8", "int4"]) | HEADER_VALUES,
                    "block": st.integers(-1, 2**17) | HEADER_VALUES,
                    "rounding": st.sampled_from(["stochastic", "nearest"]) | HEADER_VALUES,
                    "topk": st.none() | st.floats() | HEADER_VALUES,
                },
            )
            | HEADER_VALUES,
            "tensors": st.dictionaries(
                st.text("ab", min_size=1, max_size=2),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "shape": st.lists(st.integers(0, 2**63 - 1) | st.integers(0, 4), max_size=9) | HEADER_VALUES,
                        "kept": st.integers(0, 2**63 - 1) | st.integers(0, 16) | HEADER_VALUES,
                    },
                )
                | HEADER_VALUES,
                max_size=3,
            )
            | HEADER_VALUES,
        },
        optional={"meta": st.dictionaries(st.text(max_size=4), HEADER_VALUES, max_size=2) | HEADER_VALUES},
    ),
    st.binary(max_size=64),
)
def test_forged_update_headers_are_refused_before_allocation(header: dict[str, Any], parts: bytes) -> None:
    """Any header (huge shapes included) in front of a small payload: a CodecError, within HEADROOM."""
    packed = msgpack.packb(header, use_bin_type=True)
    body = len(packed).to_bytes(4, "little") + packed + parts
    only_raises(CodecError, lambda: decode_update(UPDATE_MAGIC + zstandard.ZstdCompressor().compress(body)))


def _zstd_frame_claiming(size: int) -> bytes:
    """A zstd frame whose header declares `size` bytes of content, followed by one empty last block."""
    descriptor = 0b1110_0000  # 8-byte frame content size, single segment
    return b"\x28\xb5\x2f\xfd" + bytes([descriptor]) + size.to_bytes(8, "little") + b"\x01\x00\x00"


def _safetensors_claiming(shape: list[int]) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * math.prod(shape)]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\x00" * 16


@pytest.mark.parametrize("size", [2**31, 2**40, 2**63])
def test_zstd_frames_claiming_huge_content_are_refused(size: int) -> None:
    """Regression: zstandard allocated what a 16-byte frame declared (2**40: MemoryError; 2**31: 2 GB)."""
    for magic in (MAGIC, UPDATE_MAGIC):
        with bounded_memory(), pytest.raises(CodecError, match="declares"):
            decode_tensors(magic + _zstd_frame_claiming(size), max_bytes=64 * 1024 * 1024)


def test_zstd_frames_without_a_declared_size_allocate_only_what_they_hold() -> None:
    """Regression: with no size in the frame, zstandard allocated all of max_output_size up front."""
    compressor = zstandard.ZstdCompressor(write_content_size=False)
    payload = encode_tensors({"w": torch.ones(3)})
    body = compressor.compress(zstandard.ZstdDecompressor().decompress(payload[4:]))
    with bounded_memory():
        assert decode_tensors(MAGIC + body, max_bytes=2**40)["w"].tolist() == [1.0] * 3
        with pytest.raises(CodecError, match="truncated"):
            decode_tensors(MAGIC + body[:-4], max_bytes=2**40)
        with pytest.raises(CodecError, match="exceeds"):  # a zstd bomb: 64 MB of zeros in a few KB
            decode_tensors(MAGIC + compressor.compress(bytes(64 << 20)), max_bytes=1 << 20)


@pytest.mark.parametrize("shape", [[2**20, 2**20], [2**62], [2**16, 2**16, 2**16]])
def test_payloads_claiming_huge_tensors_are_refused_before_allocation(shape: list[int]) -> None:
    dense = MAGIC + zstandard.ZstdCompressor().compress(_safetensors_claiming(shape))
    header = msgpack.packb(
        {
            "v": 1,
            "codec": {"dtype": "float32", "quantize": "none", "block": 64, "rounding": "nearest", "topk": None},
            "tensors": {"w": {"shape": shape, "kept": math.prod(shape)}},
        }
    )
    update = UPDATE_MAGIC + zstandard.ZstdCompressor().compress(len(header).to_bytes(4, "little") + header + b"{}")
    for blob in (dense, update):
        with bounded_memory(), pytest.raises(CodecError):
            decode_tensors(blob)


def test_safetensors_parts_in_the_wrong_dtype_are_refused() -> None:
    """A part that declares the header's shape but another dtype is refused, not reinterpreted."""
    tensors = {"w": torch.ones(4)}
    header = msgpack.packb(
        {
            "v": 1,
            "codec": {"dtype": "float16", "quantize": "none", "block": 64, "rounding": "nearest", "topk": None},
            "tensors": {"w": {"shape": [4], "kept": 4}},
        }
    )
    parts = safetensors.torch.save({"w/v": torch.ones(4, dtype=torch.int16)})
    blob = UPDATE_MAGIC + zstandard.ZstdCompressor().compress(len(header).to_bytes(4, "little") + header + parts)
    with pytest.raises(CodecError, match="dtype"):
        decode_update(blob, expected=tensors)


# -- forward-gradient uploads (shared/forward_grad.py) ---------------------------------------------

SEED_SCALARS = st.integers(0, 64).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n, unique=True),
        st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=n, max_size=n),
        st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=n, max_size=n),
    )
)


@FUZZ
@given(SEED_SCALARS)
def test_seed_scalars_round_trip(triples: tuple[list[int], list[float], list[float]]) -> None:
    indices, grads, losses = triples
    upload = decode_seed_scalars(encode_seed_scalars(indices, grads, losses))
    assert upload.indices.tolist() == indices
    assert upload.grads.tolist() == grads and upload.losses.tolist() == losses
    validate_upload(upload, expected_count=len(indices), candidate_count=2**32)


@FUZZ
@given(st.binary(max_size=512) | SEED_SCALARS.flatmap(lambda t: mutations(encode_seed_scalars(*t))))
def test_seed_scalars_garbage_is_an_upload_error(blob: bytes) -> None:
    upload = only_raises(UploadError, lambda: decode_seed_scalars(blob))
    if upload is not None:
        only_raises(UploadError, lambda: validate_upload(upload, expected_count=len(upload), candidate_count=100))


@FUZZ
@given(
    st.fixed_dictionaries(
        {"v": st.just(1) | MSGPACK_VALUES}, optional={k: MSGPACK_VALUES for k in ("idx", "g", "loss")}
    )
)
def test_seed_scalars_structured_garbage_is_an_upload_error(data: dict[str, Any]) -> None:
    only_raises(UploadError, lambda: decode_seed_scalars(msgpack.packb(data, use_bin_type=True)))


TRAJECTORIES = st.lists(
    st.integers(1, 8).flatmap(
        lambda n: st.builds(
            TrajectoryStep,
            indices=st.lists(st.integers(0, 31), min_size=n, max_size=n, unique=True).map(
                lambda v: np.asarray(v, dtype=np.uint32)
            ),
            grads=st.lists(st.floats(-60000, 60000, width=16), min_size=n, max_size=n).map(
                lambda v: np.asarray(v, dtype=np.float16)
            ),
            lr=st.floats(0, 10, allow_nan=False),
        )
    ),
    min_size=1,
    max_size=5,
)


@FUZZ
@given(TRAJECTORIES, st.lists(st.floats(width=32, allow_nan=False), max_size=5))
def test_trajectories_round_trip(steps: list[TrajectoryStep], losses: list[float]) -> None:
    decoded = decode_trajectory(encode_trajectory(steps, losses), max_steps=5, max_per_step=8, candidates_per_step=32)
    assert [s.indices.tolist() for s in decoded] == [s.indices.tolist() for s in steps]
    assert [s.grads.tolist() for s in decoded] == [s.grads.tolist() for s in steps]
    assert [s.lr for s in decoded] == [float(s.lr) for s in steps]


def _trajectory_body(data: Any) -> bytes:
    return TRAJECTORY_MAGIC + zstandard.ZstdCompressor().compress(msgpack.packb(data, use_bin_type=True))


@FUZZ
@given(
    st.binary(max_size=512).map(lambda b: TRAJECTORY_MAGIC + b)
    | TRAJECTORIES.flatmap(lambda s: mutations(encode_trajectory(s, [1.0])))
    | TRAJECTORIES.flatmap(
        lambda s: mutations(zstandard.ZstdDecompressor().decompress(encode_trajectory(s, [1.0])[4:]))
    ).map(lambda body: TRAJECTORY_MAGIC + zstandard.ZstdCompressor().compress(body))
    | st.fixed_dictionaries(
        {
            "v": st.just(1) | MSGPACK_VALUES,
            "steps": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "idx": st.binary(max_size=32) | MSGPACK_VALUES,
                        "g": st.binary(max_size=16) | MSGPACK_VALUES,
                        "lr": st.floats() | st.integers(-(2**63), 2**64 - 1) | MSGPACK_VALUES,
                    },
                )
                | MSGPACK_VALUES,
                max_size=6,
            )
            | MSGPACK_VALUES,
        }
    ).map(_trajectory_body)
)
def test_trajectory_garbage_is_an_upload_error(blob: bytes) -> None:
    only_raises(UploadError, lambda: decode_trajectory(blob, max_steps=5, max_per_step=8, candidates_per_step=32))


def test_trajectory_claiming_a_huge_content_size_is_refused() -> None:
    """Regression: as for tensor payloads, the trajectory's zstd frame made the aggregator allocate 1 TB."""
    with bounded_memory(), pytest.raises(UploadError, match="declares"):
        decode_trajectory(
            TRAJECTORY_MAGIC + _zstd_frame_claiming(2**40), max_steps=5, max_per_step=8, candidates_per_step=32
        )


POOLS = st.lists(st.floats(-60000, 60000, width=16), min_size=1, max_size=64).map(
    lambda v: np.asarray(v, dtype=np.float16)
)


@FUZZ
@given(POOLS)
def test_pools_round_trip(coefficients: np.ndarray) -> None:
    assert decode_pool(encode_pool(coefficients), len(coefficients)).tolist() == coefficients.tolist()


@FUZZ
@given(
    st.binary(max_size=256).map(lambda b: POOL_MAGIC + b)
    | POOLS.flatmap(lambda c: mutations(encode_pool(c)))
    | MSGPACK_VALUES.map(lambda v: POOL_MAGIC + msgpack.packb(v, use_bin_type=True))
    | st.dictionaries(st.sampled_from(["v", "c"]), MSGPACK_VALUES).map(
        lambda v: POOL_MAGIC + msgpack.packb(v, use_bin_type=True)
    )
)
def test_pool_garbage_is_an_upload_error(blob: bytes) -> None:
    only_raises(UploadError, lambda: decode_pool(blob, pool_size=16))


# -- job specs (shared/spec.py): JSON, YAML files, --set overrides ----------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)
SPEC_FIELDS = {name: JSON_VALUES for name in JobSpec.model_fields}
VALID_SPECS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.from_regex(r"^[A-Za-z0-9._-]{1,20}$", fullmatch=True),
        "num_clients": st.integers(8, 100),
        "clients_per_round": st.integers(1, 8),
        "rounds": st.integers(1, 50),
        "local_steps": st.integers(1, 100),
        "seed": st.integers(0, 2**31 - 1),
        "quorum": st.floats(0.01, 1.0),
        "compression": st.fixed_dictionaries({}, optional={"quantize": st.sampled_from(["none", "int8", "int4"])}),
        "lora": st.fixed_dictionaries({}, optional={"r": st.integers(1, 64)}),
    },
)


@FUZZ
@given(st.fixed_dictionaries({}, optional=SPEC_FIELDS) | JSON_VALUES)
def test_spec_json_garbage_is_a_spec_error(data: Any) -> None:
    # Through JSON text, as the API and `pwff run --resume` read it.
    only_raises(SpecError, lambda: parse_spec(json.loads(json.dumps(data))))


@FUZZ
@given(VALID_SPECS)
def test_specs_round_trip_through_json_and_yaml(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any]) -> None:
    spec = parse_spec(json.loads(json.dumps(data)))
    assert parse_spec(json.loads(spec.model_dump_json())) == spec
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert load_spec_file(str(path)) == spec


OVERRIDE_KEYS = st.sampled_from(
    ["rounds", "lora.r", "compression.quantize", "name", "fwd.perturbations_per_task", "x.y", ""]
) | st.text(max_size=12)


@FUZZ
@given(
    st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.lists(st.tuples(OVERRIDE_KEYS, st.text(max_size=12)).map("=".join) | st.text(max_size=16), max_size=3),
)
def test_spec_yaml_files_and_overrides_only_raise_spec_errors(
    tmp_path_factory: pytest.TempPathFactory, text: str, overrides: list[str]
) -> None:
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    only_raises(SpecError, lambda: load_spec_file(str(path), overrides))


@FUZZ
@given(VALID_SPECS, st.lists(st.tuples(OVERRIDE_KEYS, st.text(max_size=12)).map("=".join), min_size=1, max_size=3))
def test_spec_overrides_on_valid_specs_only_raise_spec_errors(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any], overrides: list[str]
) -> None:
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    only_raises(SpecError, lambda: load_spec_file(str(path), overrides))


@pytest.mark.parametrize("value", ["[", "!0 x", "\x1f", "'unterminated", "*alias", "{a: 1"])
def test_override_values_that_are_not_yaml_are_spec_errors(tmp_path: Path, value: str) -> None:
    """Regression: `--set name=[` (and the like) raised yaml's own errors out of load_spec_file."""
    path = tmp_path / "spec.yaml"
    path.write_text("rounds: 2\n")
    with pytest.raises(SpecError, match="not a YAML value"):
        load_spec_file(str(path), [f"name={value}"])


def test_a_yaml_spec_of_exponential_aliases_is_refused_within_bounded_memory(tmp_path: Path) -> None:
    """A 'billion laughs' file: PyYAML shares the aliased nodes, and validation stops at the first bad field."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    lines.append("personalization: {personal: *a8}")
    path = tmp_path / "spec.yaml"
    path.write_text("\n".join(lines) + "\n")
    with bounded_memory(), pytest.raises(SpecError):
        load_spec_file(str(path))
