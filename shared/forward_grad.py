"""Forward gradients (FwdLLM): the math shared by the worker and the aggregator.

A direction v is a standard normal vector over the perturbed parameters, drawn from a
CPU `torch.Generator` whose seed derives from (job seed, round, client, wave, index):
the worker and the aggregator regenerate exactly the same v, so a client uploads
(index, g, loss) triples — bytes — instead of dense tensors. With v ~ N(0, I),
E[(grad . v) v] = grad, so the mean of g_i v_i estimates the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import torch
import zstandard

from shared.codec import CodecError, decompress_bounded
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

    def unflatten_rows(self, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        """`unflatten` of every row of a (rows, dim) matrix at once: name -> (rows, *shape) views."""
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = matrix[:, offset : offset + size].reshape(len(matrix), *shape)
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


# -- local zeroth-order steps: a client's trajectory as seeds and scalars -------------------

TRAJECTORY_VERSION = 2
MAX_TRAJECTORY_STEPS = 100_000


def local_seed(job_seed: int, round_: int, client: int, wave: int, step: int, index: int) -> int:
    """The seed of candidate direction `index` of local step `step` (disjoint from FedSGD's seeds)."""
    return derive_seed("perturb-local", job_seed, round_, client, wave, step, index)


TRAJECTORY_MAGIC = b"PWZ2"
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class TrajectoryStep:
    indices: np.ndarray  # uint32: candidate indices within the step
    grads: np.ndarray  # float16: directional derivative along each (the client applied these values)
    lr: float

    def __len__(self) -> int:
        return len(self.indices)


def as_wire_scalar(g: float) -> float:
    """A directional derivative as it travels (float16): the client steps with exactly this value."""
    return float(np.float16(max(-FLOAT16_MAX, min(FLOAT16_MAX, g))))


def encode_trajectory(steps: Sequence[TrajectoryStep], losses: Sequence[float]) -> bytes:
    """Per step: candidate indices (delta-friendly uint32, compressed away when contiguous), g in float16, lr."""
    packed = msgpack.packb(
        {
            "v": TRAJECTORY_VERSION,
            "steps": [
                {
                    "idx": np.asarray(step.indices, dtype="<u4").tobytes(),
                    "g": np.asarray(step.grads, dtype="<f2").tobytes(),
                    "lr": float(step.lr),
                }
                for step in steps
            ],
            "loss": np.asarray(list(losses), dtype="<f4").tobytes(),
        },
        use_bin_type=True,
    )
    return TRAJECTORY_MAGIC + zstandard.ZstdCompressor(level=19).compress(packed)


def decode_trajectory(blob: bytes, max_steps: int, max_per_step: int, candidates_per_step: int) -> list[TrajectoryStep]:
    """A client's local steps, checked completely: counts, indices, finiteness (raises UploadError)."""
    limit = 8 * (max_steps * max_per_step + max_steps) + 1024
    if not blob.startswith(TRAJECTORY_MAGIC):
        raise UploadError("not a trajectory upload of a known version")
    try:
        packed = decompress_bounded(blob[len(TRAJECTORY_MAGIC) :], limit)
    except CodecError as error:
        raise UploadError(str(error)) from None
    if len(packed) > limit:
        raise UploadError(f"trajectory of {len(packed)} bytes is too large")
    try:
        data = msgpack.unpackb(packed, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several types for garbage
        raise UploadError(f"not a msgpack map: {error}") from None
    if not isinstance(data, dict) or data.get("v") != TRAJECTORY_VERSION or not isinstance(data.get("steps"), list):
        raise UploadError("not a trajectory upload of a known version")
    raw_steps = data["steps"]
    if not 1 <= len(raw_steps) <= max_steps:
        raise UploadError(f"{len(raw_steps)} local steps is outside 1..{max_steps}")
    return [_decode_step(number, raw, max_per_step, candidates_per_step) for number, raw in enumerate(raw_steps)]


def _decode_step(number: int, raw: object, max_per_step: int, candidates_per_step: int) -> TrajectoryStep:
    try:
        assert isinstance(raw, dict)
        indices = np.frombuffer(raw["idx"], dtype="<u4")
        grads = np.frombuffer(raw["g"], dtype="<f2")
        lr = float(raw["lr"])
    except (AssertionError, KeyError, TypeError, ValueError) as error:
        raise UploadError(f"step {number}: malformed: {error}") from None
    if len(indices) != len(grads) or not 1 <= len(indices) <= max_per_step:
        raise UploadError(f"step {number}: {len(indices)} indices and {len(grads)} g (1..{max_per_step} allowed)")
    if not (np.isfinite(grads).all() and math.isfinite(lr)) or lr < 0:
        raise UploadError(f"step {number}: NaN, infinite or negative values")
    if int(indices.max()) >= candidates_per_step:
        raise UploadError(f"step {number}: unknown seed {int(indices.max())} (of {candidates_per_step})")
    if len(np.unique(indices)) != len(indices):
        raise UploadError(f"step {number}: the same seed appears twice")
    return TrajectoryStep(indices, grads, lr)


def debias_along(estimate: torch.Tensor, reference: torch.Tensor, alignment: float) -> torch.Tensor:
    """Undo discriminative sampling's stretch along its reference.

    Keeping the candidates most aligned with the reference r makes E[v v^T] over the kept directions
    I + (a - 1) r r^T (r the unit reference, a = E[(v . r)^2 | kept]): mean_i g_i v_i estimates the
    gradient with its component along r about a times too long (a ~ 4.4 for the top 10%). Dividing that
    component by a, measured on the kept directions themselves (`alignment`: the mean of (v_i . r)^2),
    leaves an unbiased estimate that keeps the lower variance of the aligned directions.
    """
    norm = reference.norm()
    if float(norm) == 0.0 or alignment <= 0.0:
        return estimate
    unit = (reference / norm).to(estimate.dtype)
    return estimate - (1.0 - 1.0 / alignment) * (estimate @ unit) * unit


def replay_trajectory(
    steps: Sequence[TrajectoryStep],
    seed_of: Callable[[int, int], int],
    dim: int,
    momentum: float,
    steered: Callable[[int], bool] | None = None,
) -> torch.Tensor:
    """The model delta a client applied, rebuilt from its seeds and scalars in float64.

    Step k moved the perturbed parameters by -lr_k m_k, where m_k = momentum m_(k-1) + e_k, e_k =
    mean_i g_i v_i and v_i is regenerated from `seed_of(k, index)`: no data and no model run on the
    server. On the steps that `steered` names (discriminative sampling against the previous step's
    estimate), e_k is debiased along that estimate as the client did (`debias_along`).
    """
    delta = torch.zeros(dim, dtype=torch.float64)
    buffer = torch.zeros(dim, dtype=torch.float64)
    reference: torch.Tensor | None = None
    for number, step in enumerate(steps):
        steer = steered is not None and steered(number) and reference is not None
        unit = reference / reference.norm() if steer and reference is not None and reference.norm() > 0 else None
        estimate = torch.zeros(dim, dtype=torch.float64)
        alignment = 0.0
        for index, g in zip(step.indices.tolist(), step.grads.tolist(), strict=True):
            v = direction(seed_of(number, index), dim).to(torch.float64)
            estimate += v * float(g)
            if unit is not None:
                alignment += float(v @ unit) ** 2 / len(step)
        estimate /= len(step)
        if unit is not None and reference is not None:
            estimate = debias_along(estimate, reference, alignment)
        buffer = momentum * buffer + estimate
        delta -= step.lr * buffer
        reference = estimate
    return delta


# -- local steps drawn from a seed pool: one coefficient per pool seed (FedKSeed) ---------

POOL_MAGIC = b"PWP1"


def pool_seed(job_seed: int, round_: int, client: int, wave: int, index: int) -> int:
    return derive_seed("perturb-pool", job_seed, round_, client, wave, index)


def pool_directions(seeds: Sequence[int], dim: int) -> torch.Tensor:
    return torch.stack([direction(seed, dim) for seed in seeds])


def encode_pool(coefficients: np.ndarray) -> bytes:
    """Two bytes per pool seed; the task's loss travels in its announcement."""
    packed = msgpack.packb({"v": 1, "c": np.asarray(coefficients, dtype="<f2").tobytes()}, use_bin_type=True)
    return POOL_MAGIC + packed


def decode_pool(blob: bytes, pool_size: int) -> np.ndarray:
    """The float16 coefficients of a pool upload, checked (raises UploadError)."""
    if not blob.startswith(POOL_MAGIC) or len(blob) > 2 * pool_size + 64:
        raise UploadError("not a seed-pool upload of a known version and size")
    try:
        data = msgpack.unpackb(blob[len(POOL_MAGIC) :], raw=False, strict_map_key=True)
        coefficients = np.frombuffer(data["c"], dtype="<f2")
    except Exception as error:  # msgpack raises several types for garbage
        raise UploadError(f"malformed pool upload: {error}") from None
    if len(coefficients) != pool_size:
        raise UploadError(f"{len(coefficients)} coefficients for a pool of {pool_size}")
    if not np.isfinite(coefficients).all():
        raise UploadError("NaN or infinite coefficients")
    return coefficients


def replay_pool(coefficients: np.ndarray, directions: torch.Tensor) -> torch.Tensor:
    """The client's delta: the pool directions weighted by their coefficients, in float64."""
    return torch.from_numpy(coefficients.astype(np.float64)) @ directions.to(torch.float64)
