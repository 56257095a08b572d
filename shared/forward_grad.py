"""Forward gradients (FwdLLM): the math shared by the worker and the aggregator.

A direction v is a standard normal vector over the perturbed parameters, drawn from a
CPU `torch.Generator` whose seed derives from (job seed, round, client, wave, index):
the worker and the aggregator regenerate exactly the same v, so a client uploads
(index, g, loss) triples — bytes — instead of dense tensors. With v ~ N(0, I),
E[(grad . v) v] = grad, so the mean of g_i v_i estimates the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from shared.seeding import derive_seed

UPLOAD_VERSION = 1
MAX_PERTURBATIONS_PER_UPLOAD = 100_000


class UploadError(ValueError):
    """A seed-scalar upload that cannot be merged (wrong length, NaN, unknown seed)."""


@dataclass(frozen=True)
class ParamSpace:
    """The perturbed parameters in a fixed order: how a flat direction maps onto named tensors."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], selection: str = "all") -> ParamSpace:
        names = tuple(sorted(name for name in state if selects(selection, name)))
        if not names:
            raise ValueError(f"no trainable tensor matches the perturbation selection {selection!r}")
        return cls(names, tuple(tuple(state[name].shape) for name in names))

    @property
    def dim(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[name].reshape(-1).to(torch.float32) for name in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = vector[offset : offset + size].view(shape)
            offset += size
        return out


def selects(selection: str, name: str) -> bool:
    """Which trainable tensors a `fwd.perturb` selection covers."""
    if selection == "all":
        return True
    if selection == "lora":
        return "lora_" in name
    if selection == "head":
        return "modules_to_save" in name
    raise ValueError(f"unknown perturbation selection {selection!r}")


def candidate_seed(job_seed: int, round_: int, client: int, wave: int, index: int) -> int:
    return derive_seed("perturb", job_seed, round_, client, wave, index)


def direction(seed: int, dim: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, generator=generator, dtype=torch.float32)


def select_directions(
    seeds: Sequence[int], dim: int, reference: torch.Tensor | None, keep: int, chunk: int = 1000
) -> tuple[list[int], list[float]]:
    """Discriminative sampling: the `keep` candidates most aligned with `reference`.

    Alignment is |cosine|: v and -v give the same estimate (g flips sign with v), so a
    direction is as useful as its opposite. Candidates are scored in chunks of `chunk`
    with a running top-k across chunks, so memory stays O(chunk x dim) for any number of
    candidates and every chunk competes (not just the last). Returns candidate positions
    (into `seeds`) in ascending order, and their cosines.
    """
    if keep > len(seeds):
        raise ValueError(f"cannot keep {keep} of {len(seeds)} candidates")
    if reference is None or keep == len(seeds) or float(reference.norm()) == 0.0:
        return list(range(keep)), [0.0] * keep
    unit = reference.to(torch.float32) / reference.norm()
    best_scores = torch.empty(0)
    best_positions = torch.empty(0, dtype=torch.long)
    best_cosines = torch.empty(0)
    for start in range(0, len(seeds), chunk):
        block = torch.stack([direction(seed, dim) for seed in seeds[start : start + chunk]])
        cosines = (block @ unit) / block.norm(dim=1)
        scores = torch.cat([best_scores, cosines.abs()])
        positions = torch.cat([best_positions, torch.arange(start, start + len(block))])
        all_cosines = torch.cat([best_cosines, cosines])
        # Stable ordering on ties (larger score first, then lower position) keeps the choice deterministic.
        order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), int(positions[i])))[:keep]
        best_scores, best_positions, best_cosines = scores[order], positions[order], all_cosines[order]
    pairs = sorted(zip(best_positions.tolist(), best_cosines.tolist(), strict=True))
    return [p for p, _ in pairs], [c for _, c in pairs]


# -- the upload: (index, g, loss) triples as packed little-endian arrays ---------------------


@dataclass(frozen=True)
class SeedScalars:
    indices: np.ndarray  # uint32: candidate index within the task's candidate range
    grads: np.ndarray  # float32: directional derivative along each chosen direction
    losses: np.ndarray  # float32: loss at the unperturbed point (fd: mean of the two passes)

    def __len__(self) -> int:
        return len(self.indices)


def encode_seed_scalars(indices: Iterable[int], grads: Iterable[float], losses: Iterable[float]) -> bytes:
    return msgpack.packb(
        {
            "v": UPLOAD_VERSION,
            "idx": np.asarray(list(indices), dtype="<u4").tobytes(),
            "g": np.asarray(list(grads), dtype="<f4").tobytes(),
            "loss": np.asarray(list(losses), dtype="<f4").tobytes(),
        },
        use_bin_type=True,
    )


def decode_seed_scalars(blob: bytes) -> SeedScalars:
    if len(blob) > 16 * MAX_PERTURBATIONS_PER_UPLOAD:
        raise UploadError(f"upload of {len(blob)} bytes is too large")
    try:
        data = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several types for garbage
        raise UploadError(f"not a msgpack map: {error}") from None
    if not isinstance(data, dict) or data.get("v") != UPLOAD_VERSION:
        raise UploadError("not a seed-scalar upload of a known version")
    try:
        indices = np.frombuffer(data["idx"], dtype="<u4")
        grads = np.frombuffer(data["g"], dtype="<f4")
        losses = np.frombuffer(data["loss"], dtype="<f4")
    except (KeyError, TypeError, ValueError) as error:
        raise UploadError(f"malformed arrays: {error}") from None
    if not len(indices) == len(grads) == len(losses):
        raise UploadError(f"array lengths differ: {len(indices)} indices, {len(grads)} g, {len(losses)} losses")
    if not (np.isfinite(grads).all() and np.isfinite(losses).all()):
        raise UploadError("NaN or infinite values")
    return SeedScalars(indices, grads, losses)


def validate_upload(upload: SeedScalars, expected_count: int, candidate_count: int) -> None:
    """Exactly `expected_count` distinct indices, all among the task's candidates."""
    if len(upload) != expected_count:
        raise UploadError(f"expected {expected_count} perturbations, got {len(upload)}")
    if len(upload) and int(upload.indices.max()) >= candidate_count:
        raise UploadError(f"unknown seed: index {int(upload.indices.max())} is not among {candidate_count} candidates")
    if len(np.unique(upload.indices)) != len(upload):
        raise UploadError("the same seed appears twice")


# -- the estimate, streamed, with split-half variance ---------------------------------------


class ForwardGradientEstimate:
    """Running mean of g_i v_i in float64 plus two half-sums for the split-half variance.

    Memory is three vectors of the model's perturbed size, whatever the number of clients.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.halves = [torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)]
        self.counts = [0, 0]

    @property
    def count(self) -> int:
        return self.counts[0] + self.counts[1]

    def add(self, g: float, v: torch.Tensor, half: int) -> None:
        term = v.to(torch.float64) * float(g)
        self.total += term
        self.halves[half] += term
        self.counts[half] += 1

    def add_dense(self, estimate_sum: torch.Tensor, count: int, half: int) -> None:
        """A client that uploaded its dense sum of g_i v_i over `count` perturbations."""
        term = estimate_sum.to(torch.float64)
        self.total += term
        self.halves[half] += term
        self.counts[half] += count

    def mean(self) -> torch.Tensor:
        if not self.count:
            raise ValueError("no perturbations merged")
        return (self.total / self.count).to(torch.float32)

    def variance_ratio(self) -> float:
        """Split-half variance of the mean estimate over its squared norm: in [0, ~1].

        Var(mean) ~ |mean_A - mean_B|^2 / 4 (two independent halves). Dividing by |mean|^2
        makes it scale-free, so one threshold suits different models and loss scales:
        near 1 the estimate is mostly noise, near 0 it is mostly signal. While one half is
        empty there is no evidence either way, and it reports 1 (all noise).
        """
        if min(self.counts) == 0:
            return 1.0
        mean_a = self.halves[0] / self.counts[0]
        mean_b = self.halves[1] / self.counts[1]
        variance = float(((mean_a - mean_b) ** 2).sum()) / 4.0
        norm = float(((self.total / self.count) ** 2).sum())
        return variance / norm if norm > 0 else 1.0


def half_of(client: int, index: int) -> int:
    """Which half a perturbation counts in; fixed by its identity, so arrival order does not matter."""
    return (client + index) % 2
