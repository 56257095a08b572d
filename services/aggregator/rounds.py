"""What a round accumulates, per training mode: deltas (backprop) or forward gradients (fwd).

Both merge one validated update at a time into O(model) state; `decode` checks an update
completely before anything is merged, so an invalid upload never leaves half a merge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.aggregator.fedavg import StreamingMean, apply_update
from shared.codec import check_matches, decode_tensors
from shared.forward_grad import (
    ForwardGradientEstimate,
    ParamSpace,
    SeedScalars,
    UploadError,
    candidate_seed,
    decode_seed_scalars,
    direction,
    half_of,
    validate_upload,
)
from shared.messages import UpdateReady
from shared.personalization import is_personal
from shared.spec import JobSpec
from shared.wireless import round_cost, round_profile


def candidate_count(spec: JobSpec, perturbations: int) -> int:
    return perturbations * (spec.fwd.candidates if spec.fwd.discriminative else 1)


@dataclass
class RoundAccumulator:
    """Running aggregate of one round plus the figures reported with it."""

    spec: JobSpec
    start_state: dict[str, torch.Tensor]
    merged: list[tuple[int, int]] = field(default_factory=list)  # (client, wave)
    loss_weighted: float = 0.0
    weight: float = 0.0
    upload_bytes: int = 0
    compute_s_max: float = 0.0
    compute_s_sum: float = 0.0
    cosine_sum: float = 0.0
    mean: StreamingMean = field(default_factory=StreamingMean)
    estimate: ForwardGradientEstimate | None = None
    space: ParamSpace | None = None
    shared_state: dict[str, torch.Tensor] = field(default_factory=dict)
    devices: dict[int, dict[str, float]] = field(default_factory=dict)
    """Simulated wireless cost of each client's work this round (delay, energy, link rate)."""

    def __post_init__(self) -> None:
        self.shared_state = {n: t for n, t in self.start_state.items() if not is_personal(self.spec, n)}
        if self.spec.mode == "fwd":
            self.space = ParamSpace.from_state(self.start_state, self.spec.fwd.perturb)
            self.estimate = ForwardGradientEstimate(self.space.dim)

    @property
    def clients(self) -> list[int]:
        return sorted({client for client, _ in self.merged})

    def decode(self, announce: UpdateReady, blob: bytes, max_bytes: int) -> Callable[[], None]:
        """Validate an update fully; return the merge to apply (raises CodecError/UploadError)."""
        spec = self.spec
        if spec.mode == "backprop":
            delta = decode_tensors(blob, max_bytes)
            check_matches(delta, self.shared_state)
            weight = float(announce.num_samples) if spec.aggregation.weighting == "samples" else 1.0
            return lambda: self._merge_delta(announce, delta, weight)
        assert self.space is not None
        if spec.fwd.upload == "dense":
            dense = decode_tensors(blob, max_bytes)
            check_matches(
                dense, {name: self.start_state[name] for name in self.space.names if name in self.shared_state}
            )
            full = {name: dense.get(name, torch.zeros_like(self.start_state[name])) for name in self.space.names}
            return lambda: self._merge_dense(announce, self.space.flatten(full))  # type: ignore[union-attr]
        upload = decode_seed_scalars(blob)
        # The task's budget may be below the spec's (deadline budgets); never above it.
        k = announce.perturbations
        if not 1 <= k <= spec.fwd.perturbations_per_task:
            raise UploadError(f"{k} perturbations is outside 1..{spec.fwd.perturbations_per_task}")
        validate_upload(upload, expected_count=k, candidate_count=candidate_count(spec, k))
        return lambda: self._merge_seeds(announce, upload)

    def _account(self, announce: UpdateReady, weight: float) -> None:
        spec = self.spec
        profile = round_profile(spec.devices, spec.num_clients, spec.seed, announce.client, announce.round)
        cost = round_cost(profile, announce.flops, announce.upload_bytes)
        device = self.devices.setdefault(announce.client, {"delay_s": 0.0, "energy_j": 0.0, "upload_s": 0.0})
        # A client's waves run one after the other on the same device.
        device["delay_s"] += cost.total_s
        device["upload_s"] += cost.upload_s
        device["energy_j"] += cost.total_j
        device["rate_bps"] = cost.rate_bps
        device["flops"] = device.get("flops", 0.0) + announce.flops
        self.merged.append((announce.client, announce.wave))
        self.loss_weighted += announce.train_loss * weight
        self.weight += weight
        self.upload_bytes += announce.upload_bytes
        self.compute_s_max = max(self.compute_s_max, announce.compute_s)
        self.compute_s_sum += announce.compute_s
        self.cosine_sum += announce.cosine

    def _merge_delta(self, announce: UpdateReady, delta: dict[str, torch.Tensor], weight: float) -> None:
        self.mean.add(delta, weight)
        self._account(announce, weight)

    def _merge_seeds(self, announce: UpdateReady, upload: SeedScalars) -> None:
        assert self.estimate is not None and self.space is not None
        for index, g, loss in zip(upload.indices.tolist(), upload.grads.tolist(), upload.losses.tolist(), strict=True):
            seed = candidate_seed(self.spec.seed, announce.round, announce.client, announce.wave, index)
            self.estimate.add(g, direction(seed, self.space.dim), half_of(announce.client, index), loss)
        self._account(announce, 1.0)

    def _merge_dense(self, announce: UpdateReady, estimate_sum: torch.Tensor) -> None:
        assert self.estimate is not None
        count = max(1, min(announce.perturbations, self.spec.fwd.perturbations_per_task))
        self.estimate.add_dense(estimate_sum, count, half_of(announce.client, announce.wave))
        self._account(announce, 1.0)

    # -- the step -------------------------------------------------------------------------

    def wants_more_work(self, force: bool) -> bool:
        """fwd with variance control: is the estimate still too noisy, and is there budget left?"""
        if force or self.estimate is None or self.spec.fwd.variance_control != "adaptive":
            return False
        fwd = self.spec.fwd
        within_cap = self.estimate.count + fwd.perturbations_per_task <= fwd.max_perturbations_per_step
        return within_cap and self.estimate.variance_ratio() > fwd.variance_threshold

    def next_wave(self) -> int:
        return 1 + max((wave for _, wave in self.merged), default=0)

    def apply(self, state: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor] | None, round_: int) -> Step:
        """The new global state from everything merged (server SGD on the estimate for fwd)."""
        if not self.merged:
            return Step(dict(state), None, momentum, {})
        if self.estimate is None:
            return Step(apply_update(state, self.mean.mean(), self.spec.aggregation.server_lr), None, None, {})
        assert self.space is not None
        fwd = self.spec.fwd
        gradient = self.space.unflatten(self.estimate.mean())
        direction_ = dict(gradient)
        if fwd.momentum > 0:
            previous = momentum or {name: torch.zeros_like(g) for name, g in gradient.items()}
            direction_ = {name: fwd.momentum * previous[name] + g for name, g in gradient.items()}
        lr = fwd_learning_rate(self.spec, round_)
        # Only the global part moves; personal tensors are updated by their own client.
        new_state = {
            name: value - lr * direction_[name] if name in direction_ and name in self.shared_state else value
            for name, value in state.items()
        }
        figures = {
            "perturbations": float(self.estimate.count),
            "variance": self.estimate.variance_ratio(),
            "waves": float(self.next_wave()),
            "cosine": self.cosine_sum / max(1, len(self.merged)),
            "lr": lr,
            "gradient_norm": float(self.estimate.mean().norm()),
        }
        return Step(new_state, gradient, direction_ if fwd.momentum > 0 else None, figures)


@dataclass(frozen=True)
class Step:
    state: dict[str, torch.Tensor]
    gradient: dict[str, torch.Tensor] | None
    """fwd: the applied gradient estimate, which guides the next step's discriminative sampling."""
    momentum: dict[str, torch.Tensor] | None
    figures: dict[str, float]


def fwd_learning_rate(spec: JobSpec, round_: int) -> float:
    fwd = spec.fwd
    if fwd.lr_schedule == "constant" or spec.rounds <= 1:
        return fwd.lr
    progress = (round_ - 1) / (spec.rounds - 1)
    return fwd.lr_min + 0.5 * (fwd.lr - fwd.lr_min) * (1 + math.cos(math.pi * progress))
