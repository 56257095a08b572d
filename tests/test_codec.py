"""The tensor codec: everything it decodes came from the network."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import zstandard

from shared.codec import MAGIC, CodecError, check_matches, decode_tensors, encode_tensors


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "b.weight": torch.randn(8, 4, generator=g),
        "a.bias": torch.randn(4, generator=g),
        "scalar": torch.randn((), generator=g),
    }


def _raw_blob(tensors: dict[str, torch.Tensor]) -> bytes:
    """A well-formed payload that skips encode_tensors' cast (to smuggle in any dtype or value)."""
    return MAGIC + zstandard.ZstdCompressor().compress(safetensors.torch.save(tensors))


def test_float32_round_trip_is_exact() -> None:
    original = _tensors()
    decoded = decode_tensors(encode_tensors(original, "float32"))
    assert set(decoded) == set(original)
    for name, tensor in original.items():
        assert decoded[name].dtype == torch.float32
        assert decoded[name].shape == tensor.shape
        assert torch.equal(decoded[name], tensor)


@pytest.mark.parametrize(("dtype", "rtol"), [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_precision_round_trip_within_tolerance(dtype: str, rtol: float) -> None:
    original = _tensors()
    decoded = decode_tensors(encode_tensors(original, dtype))
    for name, tensor in original.items():
        assert decoded[name].dtype == torch.float32  # always widened back
        torch.testing.assert_close(decoded[name], tensor, rtol=rtol, atol=1e-4)
        # and the cast is exactly the target dtype's rounding
        assert torch.equal(decoded[name], tensor.to(getattr(torch, dtype)).float())


def test_half_precision_payload_is_smaller() -> None:
    original = {"w": torch.randn(64, 64)}
    assert len(encode_tensors(original, "float16")) < len(encode_tensors(original, "float32"))


def test_encoding_is_deterministic_and_order_independent() -> None:
    original = _tensors()
    reordered = dict(reversed(list(original.items())))
    assert encode_tensors(original) == encode_tensors(reordered)


def test_payload_starts_with_magic() -> None:
    assert encode_tensors(_tensors()).startswith(MAGIC)


def test_bad_magic_is_rejected() -> None:
    blob = encode_tensors(_tensors())
    with pytest.raises(CodecError, match="magic"):
        decode_tensors(b"XXXX" + blob[4:])
    with pytest.raises(CodecError, match="magic"):
        decode_tensors(b"")


def test_truncated_payload_is_rejected() -> None:
    blob = encode_tensors(_tensors(), "float32")
    for cut in (len(MAGIC), len(MAGIC) + 5, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodecError):
            decode_tensors(blob[:cut])


def test_garbage_zstd_is_rejected() -> None:
    with pytest.raises(CodecError, match="zstd"):
        decode_tensors(MAGIC + b"this is not zstd at all" * 4)


def test_zstd_of_garbage_is_rejected_by_safetensors() -> None:
    with pytest.raises(CodecError, match="safetensors"):
        decode_tensors(MAGIC + zstandard.ZstdCompressor().compress(b"\x00" * 64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected(bad: float) -> None:
    tensors = _tensors()
    tensors["b.weight"][3, 1] = bad
    with pytest.raises(CodecError, match=r"'b.weight' has NaN or infinite"):
        decode_tensors(encode_tensors(tensors, "float32"))


def test_value_that_overflows_float16_is_rejected() -> None:
    # 1e6 is finite in float32 but becomes inf when cast to float16 on the way out.
    with pytest.raises(CodecError, match="NaN or infinite"):
        decode_tensors(encode_tensors({"w": torch.tensor([1e6])}, "float16"))


def test_oversized_decompression_is_rejected() -> None:
    blob = encode_tensors({"w": torch.zeros(1024, 1024)}, "float32")  # 4 MiB raw, tiny compressed
    assert len(blob) < 64 * 1024
    with pytest.raises(CodecError):
        decode_tensors(blob, max_bytes=1024 * 1024)
    assert decode_tensors(blob, max_bytes=8 * 1024 * 1024)["w"].shape == (1024, 1024)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_float_tensors_are_rejected(dtype: torch.dtype) -> None:
    blob = _raw_blob({"ok": torch.zeros(2), "ids": torch.zeros(3, dtype=dtype)})
    with pytest.raises(CodecError, match=r"'ids' has non-float dtype"):
        decode_tensors(blob)


def test_float64_payload_decodes_to_float32() -> None:
    decoded = decode_tensors(_raw_blob({"w": torch.tensor([1.5, -2.0], dtype=torch.float64)}))
    assert decoded["w"].dtype == torch.float32 and decoded["w"].tolist() == [1.5, -2.0]


def test_check_matches_accepts_same_names_and_shapes() -> None:
    check_matches(_tensors(1), _tensors(2))


def test_check_matches_missing_name() -> None:
    update = _tensors()
    del update["a.bias"]
    with pytest.raises(CodecError, match=r"missing \['a.bias'\], unexpected \[\]"):
        check_matches(update, _tensors())


def test_check_matches_extra_name() -> None:
    update = {**_tensors(), "evil": torch.zeros(1)}
    with pytest.raises(CodecError, match=r"missing \[\], unexpected \['evil'\]"):
        check_matches(update, _tensors())


def test_check_matches_shape_mismatch() -> None:
    update = _tensors()
    update["b.weight"] = torch.zeros(4, 8)
    with pytest.raises(CodecError, match=r"'b.weight' has shape \(4, 8\), expected \(8, 4\)"):
        check_matches(update, _tensors())


def test_frame_without_content_size_is_still_bounded() -> None:
    compressor = zstandard.ZstdCompressor(write_content_size=False)
    small = MAGIC + compressor.compress(safetensors.torch.save({"w": torch.ones(4)}))
    assert decode_tensors(small)["w"].tolist() == [1.0] * 4
    with pytest.raises(CodecError):
        decode_tensors(MAGIC + compressor.compress(b"\0" * (3 << 20)), max_bytes=1 << 20)
