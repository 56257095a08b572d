"""Tensors on the wire: dense safetensors payloads, and compressed updates with a self-describing header.

Two formats, both zstd-compressed, never pickled:

- dense (`PWT1`): safetensors bytes of tensors cast to float32, float16 or bfloat16. Global states,
  personal states, artifacts (and the float uploads of older workers).
- update (`PWU1`): a msgpack header (the codec, its block size, every tensor's shape and kept count,
  free metadata) followed by safetensors bytes of each tensor's encoded parts. Codecs:

  * dense values in float32/float16/bfloat16 (today's uploads, with a header);
  * `int8` / `int4`: block-wise quantization, one bfloat16 scale (absmax / levels, rounded up) per
    block of `block_size` values, with unbiased stochastic rounding drawn from a seeded generator
    (E[decoded] = the input) or round-to-nearest; 4-bit values are packed two per byte;
  * top-k sparsification (`topk`: the fraction of each tensor's entries kept, by magnitude): a
    bitmap of the kept entries plus their values, dense or quantized as above.

  `encode_update` returns the bytes and the exact tensors `decode_update` will produce from them,
  so a client can keep the residual of what it did not send (error feedback).

Everything decoded here came from the network: decoding bounds every size (the decompressed bytes,
the header, the tensors the header claims), checks the header against the payload part by part and
against the expected tensors when given, and rejects non-finite values.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import safetensors.torch
import torch
import zstandard

if TYPE_CHECKING:
    from shared.spec import CompressionSpec

MAGIC = b"PWT1"
UPDATE_MAGIC = b"PWU1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LEVELS = {"int8": 127, "int4": 7}
"""Largest quantized magnitude of each quantizer: values are integers in [-levels, levels]."""
QUANTIZERS = ("none", *LEVELS)
_HEADER_VERSION = 1
_MAX_HEADER_BYTES = 4 * 1024 * 1024
_MAX_BLOCK = 1 << 16


class CodecError(ValueError):
    """Bytes that are not a valid tensor payload."""


RESIDUAL_PREFIX = "codec-residual/"
"""Client-side codec state: in a client's state, `RESIDUAL_PREFIX + tensor` is the error-feedback residual
of that tensor (what its codec has not sent yet). Stored apart from its personal tensors, never loaded into
a model, never uploaded."""


def split_residual(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the model's tensors, the error-feedback residual by tensor name) of a client's state."""
    model = {name: t for name, t in state.items() if not name.startswith(RESIDUAL_PREFIX)}
    residual = {name[len(RESIDUAL_PREFIX) :]: t for name, t in state.items() if name.startswith(RESIDUAL_PREFIX)}
    return model, residual


# -- dense payloads (PWT1) ------------------------------------------------------------------------


def encode_tensors(tensors: Mapping[str, torch.Tensor], dtype: str = "float16", zstd_level: int = 3) -> bytes:
    target = _DTYPES[dtype]
    cast = {name: t.detach().to("cpu", target).contiguous() for name, t in sorted(tensors.items())}
    raw = safetensors.torch.save(cast)
    return MAGIC + zstandard.ZstdCompressor(level=zstd_level).compress(raw)


def decompress_bounded(body: bytes, max_bytes: int) -> bytes:
    """A zstd frame's content, refused (CodecError) past `max_bytes` before that much is allocated.

    zstandard's one-shot `decompress` allocates what the frame header declares, whatever
    `max_output_size` says, before it reads any content: a 16-byte frame claiming a terabyte was a
    MemoryError, one claiming 2 GB an allocation of 2 GB. So a declared size is checked first; a frame
    that declares none (pwff's encoders always write it) is decompressed a little input at a time,
    counting the output, and must end (a truncated frame is an error, not a short payload).
    """
    try:
        declared = zstandard.frame_content_size(body)
        if declared > max_bytes:
            raise CodecError(f"zstd: the frame declares {declared} bytes, more than the limit of {max_bytes}")
        if declared >= 0:
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=max_bytes)
        else:
            raw = _decompress_undeclared(body, max_bytes)
    except zstandard.ZstdError as error:
        raise CodecError(f"zstd: {error}") from None
    if len(raw) > max_bytes:
        raise CodecError(f"payload of {len(raw)} bytes exceeds {max_bytes}")
    return raw


_ZSTD_FEED = 1024
"""Input bytes per step of an undeclared-size frame: one step yields at most ~32 MB (4-byte RLE blocks)."""


def _decompress_undeclared(body: bytes, max_bytes: int) -> bytes:
    stream = zstandard.ZstdDecompressor().decompressobj()
    chunks: list[bytes] = []
    total = 0
    for start in range(0, len(body), _ZSTD_FEED):
        chunk = stream.decompress(body[start : start + _ZSTD_FEED])
        total += len(chunk)
        if total > max_bytes:
            raise CodecError(f"payload exceeds {max_bytes} bytes")
        chunks.append(chunk)
        if stream.eof:
            break
    if not stream.eof:
        raise CodecError("zstd: the frame is truncated")
    return b"".join(chunks)


def _load_safetensors(raw: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(raw)
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise CodecError(f"safetensors: {error}") from None


def decode_tensors(blob: bytes, max_bytes: int = 512 * 1024 * 1024) -> dict[str, torch.Tensor]:
    """Decode any pwff tensor payload (dense or a compressed update) to float32 tensors.

    Raises CodecError on anything malformed or non-finite.
    """
    if blob.startswith(UPDATE_MAGIC):
        return decode_update(blob, max_bytes).tensors
    if not blob.startswith(MAGIC):
        raise CodecError("payload does not start with the pwff tensor magic")
    return _decode_dense(blob, max_bytes)


def _decode_dense(blob: bytes, max_bytes: int) -> dict[str, torch.Tensor]:
    tensors = _load_safetensors(decompress_bounded(blob[len(MAGIC) :], max_bytes))
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
    check_shapes({name: tuple(t.shape) for name, t in update.items()}, reference)


def check_shapes(shapes: Mapping[str, Sequence[int]], reference: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(reference) - set(shapes))
    extra = sorted(set(shapes) - set(reference))
    if missing or extra:
        raise CodecError(f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(reference[name].shape):
            raise CodecError(f"tensor {name!r} has shape {tuple(shape)}, expected {tuple(reference[name].shape)}")


# -- codecs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """How one update is encoded (see the module docstring); recorded in every update's header."""

    dtype: str = "float16"
    """Dense values (no quantizer): the wire dtype."""
    quantize: str = "none"
    """none | int8 | int4."""
    block_size: int = 64
    """Values per quantization block (one scale each)."""
    rounding: str = "stochastic"
    """stochastic (unbiased, seeded) | nearest."""
    topk: float | None = None
    """Fraction of each tensor's entries kept (by magnitude); None keeps all."""
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise CodecError(f"unknown dtype {self.dtype!r}")
        if self.quantize not in QUANTIZERS:
            raise CodecError(f"unknown quantizer {self.quantize!r}")
        if not 1 <= self.block_size <= _MAX_BLOCK:
            raise CodecError(f"block size {self.block_size} out of range")
        if self.rounding not in ("stochastic", "nearest"):
            raise CodecError(f"unknown rounding {self.rounding!r}")
        if self.topk is not None and not (0.0 < self.topk <= 1.0):
            raise CodecError(f"top-k fraction {self.topk} out of (0, 1]")
        if not 1 <= self.zstd_level <= 22:
            raise CodecError(f"zstd level {self.zstd_level} out of range")

    @classmethod
    def for_uploads(cls, compression: CompressionSpec) -> Codec:
        return cls(
            dtype=compression.dtype,
            quantize=compression.quantize,
            block_size=compression.block_size,
            rounding=compression.rounding,
            topk=compression.topk,
            zstd_level=compression.zstd_level,
        )

    @classmethod
    def for_downloads(cls, compression: CompressionSpec) -> Codec:
        """The per-round committed deltas: a dense dtype or a quantizer, never sparsified."""
        download = compression.download
        if download in LEVELS:
            return cls(
                quantize=download,
                block_size=compression.block_size,
                rounding=compression.rounding,
                zstd_level=compression.zstd_level,
            )
        return cls(dtype=download, zstd_level=compression.zstd_level)

    @property
    def name(self) -> str:
        values = self.quantize if self.quantize != "none" else self.dtype
        return f"top{self.topk:g}+{values}" if self.topk is not None else values

    @property
    def lossless(self) -> bool:
        return self.quantize == "none" and self.topk is None and self.dtype == "float32"

    @property
    def stochastic(self) -> bool:
        return self.quantize != "none" and self.rounding == "stochastic"

    def header(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "quantize": self.quantize,
            "block": self.block_size,
            "rounding": self.rounding,
            "topk": self.topk,
        }


@dataclass(frozen=True)
class Encoded:
    blob: bytes
    decoded: dict[str, torch.Tensor]
    """Exactly what `decode_update(blob)` returns (float32): the input minus what the codec dropped."""


def kept_count(numel: int, fraction: float | None) -> int:
    """Entries top-k keeps of a tensor of `numel` entries: ceil(fraction * numel), at least one."""
    if fraction is None or numel == 0:
        return numel
    return min(numel, max(1, math.ceil(fraction * numel - 1e-9)))


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _quantize(
    values: torch.Tensor, levels: int, block: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers in [-levels, levels] (int8) and one bfloat16 scale per block, with E[q * s] = values
    under stochastic rounding (`generator` given), round-to-nearest otherwise."""
    n = values.numel()
    blocks = _blocks(n, block)
    padded = torch.nn.functional.pad(values, (0, blocks * block - n)).view(blocks, block)
    scale = padded.abs().amax(dim=1) / levels if blocks else torch.zeros(0)
    # bfloat16 scales: float32's range (LoRA deltas' scales are ~1e-6, subnormal in float16) in two bytes.
    scale16 = scale.to(torch.bfloat16)
    # Round the stored scale up, so every |value| / scale stays within the levels: no clipping, no bias.
    scale16 = torch.where(
        scale16.float() < scale, torch.nextafter(scale16, torch.full_like(scale16, math.inf)), scale16
    )
    if not torch.isfinite(scale16).all():
        raise CodecError("values too large for bfloat16 block scales")
    stored = scale16.float()
    scaled = padded / torch.where(stored > 0, stored, torch.ones_like(stored))[:, None]
    if generator is not None:
        scaled = torch.floor(scaled + torch.rand(scaled.shape, generator=generator))
    else:
        scaled = torch.round(scaled)
    q = scaled.clamp_(-levels, levels).to(torch.int8).view(-1)[:n]
    return q, scale16


def _dequantize(q: torch.Tensor, scale16: torch.Tensor, block: int) -> torch.Tensor:
    n = q.numel()
    blocks = scale16.numel()
    padded = torch.nn.functional.pad(q.to(torch.float32), (0, blocks * block - n)).view(blocks, block)
    return (padded * scale16.float()[:, None]).view(-1)[:n]


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8)  # [-7, 7] -> [1, 15]; 8 is zero
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, torch.full((1,), 8, dtype=torch.uint8)])
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_int4(packed: torch.Tensor, n: int, name: str) -> torch.Tensor:
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1)
    if bool((nibbles[:n] == 0).any()):
        raise CodecError(f"tensor {name!r} has a 4-bit value out of range")
    if nibbles.numel() > n and bool((nibbles[n:] != 8).any()):
        raise CodecError(f"tensor {name!r} has non-zero 4-bit padding")
    return (nibbles[:n].to(torch.int16) - 8).to(torch.int8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))


def _unpack_bits(packed: torch.Tensor, n: int, name: str) -> torch.Tensor:
    bits = np.unpackbits(packed.numpy(), bitorder="little")
    if bits[n:].any():
        raise CodecError(f"tensor {name!r} has bits set past its last entry")
    return torch.from_numpy(bits[:n].astype(bool))


def encode_update(
    tensors: Mapping[str, torch.Tensor],
    codec: Codec,
    seed: int | None = None,
    meta: Mapping[str, str | int] | None = None,
) -> Encoded:
    """Encode float tensors with `codec`; `seed` (required by stochastic rounding) seeds its draws.

    Tensors are taken in sorted-name order, so the same tensors, codec and seed give the same bytes.
    """
    if codec.stochastic and seed is None:
        raise ValueError("stochastic rounding needs a seed (derive it from the job seed, round, client and wave)")
    generator = torch.Generator().manual_seed(seed) if codec.stochastic and seed is not None else None
    entries: dict[str, dict[str, Any]] = {}
    parts: dict[str, torch.Tensor] = {}
    decoded: dict[str, torch.Tensor] = {}
    for name, tensor in sorted(tensors.items()):
        flat = tensor.detach().to("cpu", torch.float32).reshape(-1)
        if not torch.isfinite(flat).all():
            raise CodecError(f"tensor {name!r} has NaN or infinite values")
        numel = flat.numel()
        kept = kept_count(numel, codec.topk)
        entries[name] = {"shape": list(tensor.shape), "kept": kept}
        values = flat
        mask: torch.Tensor | None = None
        if codec.topk is not None:
            index = torch.topk(flat.abs(), kept, sorted=False).indices
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[index] = True
            parts[f"{name}/mask"] = _pack_bits(mask)
            values = flat[mask]
        if codec.quantize != "none":
            q, scale16 = _quantize(values, LEVELS[codec.quantize], codec.block_size, generator)
            parts[f"{name}/q"] = _pack_int4(q) if codec.quantize == "int4" else q
            parts[f"{name}/s"] = scale16
            restored = _dequantize(q, scale16, codec.block_size)
        else:
            cast = values.to(_DTYPES[codec.dtype])
            if not torch.isfinite(cast).all():
                raise CodecError(f"tensor {name!r} overflows {codec.dtype}")
            parts[f"{name}/v"] = cast
            restored = cast.to(torch.float32)
        if mask is not None:
            dense = torch.zeros(numel, dtype=torch.float32)
            dense[mask] = restored
            restored = dense
        decoded[name] = restored.view(tensor.shape)
    header = msgpack.packb(
        {"v": _HEADER_VERSION, "codec": codec.header(), "tensors": entries, "meta": dict(meta or {})}
    )
    body = len(header).to_bytes(4, "little") + header + safetensors.torch.save(parts)
    blob = UPDATE_MAGIC + zstandard.ZstdCompressor(level=codec.zstd_level).compress(body)
    return Encoded(blob, decoded)


@dataclass(frozen=True)
class Update:
    tensors: dict[str, torch.Tensor]
    codec: Codec | None
    """None for a dense PWT1 payload."""
    meta: dict[str, str | int]


def _field(mapping: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CodecError(f"header: {where}{key} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _parse_header(raw: bytes) -> tuple[Codec, dict[str, tuple[tuple[int, ...], int]], dict[str, str | int]]:
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise CodecError(f"header: not msgpack ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise CodecError("header: not a map")
    if header.get("v") != _HEADER_VERSION:
        raise CodecError(f"header: unsupported version {header.get('v')!r}")
    spec = _field(header, "codec", dict, "")
    topk = spec.get("topk")
    if topk is not None and (not isinstance(topk, float | int) or isinstance(topk, bool)):
        raise CodecError("header: codec.topk is not a number")
    try:
        codec = Codec(
            dtype=_field(spec, "dtype", str, "codec."),
            quantize=_field(spec, "quantize", str, "codec."),
            block_size=_field(spec, "block", int, "codec."),
            rounding=_field(spec, "rounding", str, "codec."),
            topk=float(topk) if topk is not None else None,
        )
    except CodecError as error:
        raise CodecError(f"header: {error}") from None
    entries: dict[str, tuple[tuple[int, ...], int]] = {}
    for name, entry in _field(header, "tensors", dict, "").items():
        if not isinstance(entry, dict):
            raise CodecError(f"header: tensor {name!r} is not a map")
        shape = _field(entry, "shape", list, f"tensors[{name!r}].")
        if len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CodecError(f"header: tensor {name!r} has a bad shape {shape!r}")
        kept = _field(entry, "kept", int, f"tensors[{name!r}].")
        numel = math.prod(shape)
        if kept != kept_count(numel, codec.topk):
            raise CodecError(
                f"header: tensor {name!r} claims {kept} kept entries, its codec keeps {kept_count(numel, codec.topk)}"
            )
        entries[name] = (tuple(shape), kept)
    meta = header.get("meta", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str | int) for v in meta.values()):
        raise CodecError("header: meta is not a map of strings and integers")
    return codec, entries, meta


def _part(parts: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    tensor = parts[key]
    if tensor.dtype != dtype:
        raise CodecError(f"part {key!r} has dtype {tensor.dtype}, expected {dtype}")
    if tensor.dim() != 1 or tensor.numel() != numel:
        raise CodecError(f"part {key!r} has shape {tuple(tensor.shape)}, expected ({numel},)")
    return tensor


def _decode_values(parts: Mapping[str, torch.Tensor], name: str, codec: Codec, count: int) -> torch.Tensor:
    if codec.quantize == "none":
        values = _part(parts, f"{name}/v", _DTYPES[codec.dtype], count).to(torch.float32)
        if not torch.isfinite(values).all():
            raise CodecError(f"tensor {name!r} has NaN or infinite values")
        return values
    levels = LEVELS[codec.quantize]
    blocks = _blocks(count, codec.block_size)
    if codec.quantize == "int4":
        q = _unpack_int4(_part(parts, f"{name}/q", torch.uint8, (count + 1) // 2), count, name)
    else:
        q = _part(parts, f"{name}/q", torch.int8, count)
        if bool((q < -levels).any()):
            raise CodecError(f"tensor {name!r} has an 8-bit value out of range")
    scale16 = _part(parts, f"{name}/s", torch.bfloat16, blocks)
    if not torch.isfinite(scale16).all() or bool((scale16 < 0).any()):
        raise CodecError(f"tensor {name!r} has a NaN, infinite or negative block scale")
    return _dequantize(q, scale16, codec.block_size)


def decode_update(
    blob: bytes, max_bytes: int = 512 * 1024 * 1024, expected: Mapping[str, torch.Tensor] | None = None
) -> Update:
    """Decode an update (PWU1, or a dense PWT1 payload) to float32 tensors.

    `expected`: the tensors the update must name, with their shapes (the header is checked
    against them before any tensor is built). Raises CodecError on anything malformed.
    """
    if blob.startswith(MAGIC):
        tensors = _decode_dense(blob, max_bytes)
        if expected is not None:
            check_matches(tensors, expected)
        return Update(tensors, None, {})
    if not blob.startswith(UPDATE_MAGIC):
        raise CodecError("payload does not start with a pwff tensor or update magic")
    raw = decompress_bounded(blob[len(UPDATE_MAGIC) :], max_bytes)
    if len(raw) < 4:
        raise CodecError("update is truncated before its header")
    length = int.from_bytes(raw[:4], "little")
    if length > _MAX_HEADER_BYTES or 4 + length > len(raw):
        raise CodecError(f"header length {length} exceeds the payload or the limit")
    codec, entries, meta = _parse_header(raw[4 : 4 + length])
    if expected is not None:
        check_shapes({name: shape for name, (shape, _) in entries.items()}, expected)
    total = sum(math.prod(shape) for shape, _ in entries.values())
    if 4 * total > max_bytes:
        raise CodecError(f"header claims {total} values, more than {max_bytes} bytes decoded")
    parts = _load_safetensors(raw[4 + length :])
    wanted: set[str] = set()
    for name in entries:
        suffixes: tuple[str, ...] = ("mask",) if codec.topk is not None else ()
        suffixes += ("q", "s") if codec.quantize != "none" else ("v",)
        wanted.update(f"{name}/{suffix}" for suffix in suffixes)
    if set(parts) != wanted:
        missing, extra = sorted(wanted - set(parts)), sorted(set(parts) - wanted)
        raise CodecError(f"payload parts differ from the header: missing {missing[:3]}, unexpected {extra[:3]}")
    out: dict[str, torch.Tensor] = {}
    for name, (shape, kept) in entries.items():
        numel = math.prod(shape)
        values = _decode_values(parts, name, codec, kept)
        if codec.topk is not None:
            mask = _unpack_bits(_part(parts, f"{name}/mask", torch.uint8, (numel + 7) // 8), numel, name)
            if int(mask.sum()) != kept:
                raise CodecError(f"tensor {name!r} has {int(mask.sum())} entries marked, its header says {kept}")
            dense = torch.zeros(numel, dtype=torch.float32)
            dense[mask] = values
            values = dense
        out[name] = values.view(shape)
    return Update(out, codec, meta)


# -- states ----------------------------------------------------------------------------------------


def apply_delta(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """state + delta, in float32, tensors without a delta kept: what the aggregator commits and what every
    worker rebuilds from the previous state and the round's download (so they agree bit for bit)."""
    return {name: value + delta[name] if name in delta else value for name, value in state.items()}


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short fingerprint of a float32 state: names, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]
