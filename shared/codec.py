"""Tensors on the wire: safetensors bytes, cast to a smaller dtype and zstd-compressed.

Never pickle: everything here decodes data that came from the network, so decoding
bounds the size, checks the format and rejects non-finite values.
"""

from __future__ import annotations

from collections.abc import Mapping

import safetensors.torch
import torch
import zstandard

MAGIC = b"PWT1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CodecError(ValueError):
    """Bytes that are not a valid tensor payload."""


def encode_tensors(tensors: Mapping[str, torch.Tensor], dtype: str = "float16", zstd_level: int = 3) -> bytes:
    target = _DTYPES[dtype]
    cast = {name: t.detach().to("cpu", target).contiguous() for name, t in sorted(tensors.items())}
    raw = safetensors.torch.save(cast)
    return MAGIC + zstandard.ZstdCompressor(level=zstd_level).compress(raw)


def decode_tensors(blob: bytes, max_bytes: int = 512 * 1024 * 1024) -> dict[str, torch.Tensor]:
    """Decode to float32 tensors; raises CodecError on anything malformed or non-finite."""
    if not blob.startswith(MAGIC):
        raise CodecError("payload does not start with the pwff tensor magic")
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob[len(MAGIC) :], max_output_size=max_bytes)
    except zstandard.ZstdError as error:
        raise CodecError(f"zstd: {error}") from None
    if len(raw) > max_bytes:
        raise CodecError(f"payload of {len(raw)} bytes exceeds {max_bytes}")
    try:
        tensors = safetensors.torch.load(raw)
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise CodecError(f"safetensors: {error}") from None
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CodecError(f"tensor {name!r} has non-float dtype {tensor.dtype}")
        value = tensor.to(torch.float32)
        if not torch.isfinite(value).all():
            raise CodecError(f"tensor {name!r} has NaN or infinite values")
        out[name] = value
    return out


def check_matches(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """An update must name exactly the reference's tensors, with the same shapes."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise CodecError(f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in update.items():
        if tensor.shape != reference[name].shape:
            raise CodecError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(reference[name].shape)}"
            )
