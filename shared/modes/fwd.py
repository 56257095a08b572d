"""Forward gradients (FwdLLM): backprop-free local work, seed-scalar uploads, server SGD on the estimate.

A task evaluates K directions v (regenerated from seeds) with two inferences each (`fd`) or one
forward-mode pass (`jvp`), and uploads (seed index, g, loss) triples, or its dense sum of g v.
The aggregator regenerates the directions, averages g v over every perturbation of the round
with a split-half variance, asks for more waves while the estimate is too noisy (variance
control), and applies server SGD (optionally with momentum). The step's estimate is kept so the
next round's tasks can prefer directions aligned with it (discriminative sampling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from shared.batches import collate, minibatches
from shared.catalog import Task, model_info
from shared.codec import check_matches, decode_tensors, encode_tensors
from shared.forward_grad import (
    ForwardGradientEstimate,
    ParamSpace,
    SeedScalars,
    UploadError,
    candidate_seed,
    decode_seed_scalars,
    direction,
    encode_seed_scalars,
    half_of,
    select_directions,
    validate_upload,
)
from shared.forward_passes import HeadLossOf, LossOf, central_difference, jvp_derivative
from shared.metrics import FWD_COSINE, FWD_PERTURBATIONS, FWD_VARIANCE
from shared.models import parameter_count
from shared.modes.base import LocalContext, LocalResult, MoreWork, RoundAccumulator, State, Step, TrainingMode
from shared.personalization import is_personal
from shared.seeding import derive_seed
from shared.wireless import fwd_perturbation_flops

if TYPE_CHECKING:
    from shared.data import Example
    from shared.messages import UpdateReady
    from shared.spec import JobSpec

GRADIENT = "gradient"
"""Artifact: the gradient estimate applied at a round (guides the next round's sampling)."""
MOMENTUM = "momentum"
"""Artifact: the server optimizer's momentum buffer after a round."""


class ForwardMode(TrainingMode):
    name = "fwd"
    artifacts = (GRADIENT, MOMENTUM)

    def unit_flops(self, spec: JobSpec, params: int, tokens: int) -> float:
        return float(fwd_perturbation_flops(params, tokens))

    def full_budget(self, spec: JobSpec) -> int:
        return spec.fwd.perturbations_per_task

    def task_fields(self, spec: JobSpec, budget: int) -> dict[str, int]:
        return {"local_steps": spec.local_steps, "perturbations": budget}

    def wave_tasks(self, spec: JobSpec, clients: int, work_so_far: int) -> int:
        per_task = spec.fwd.perturbations_per_task
        return max(0, min(clients, (spec.fwd.max_perturbations_per_step - work_so_far) // per_task))

    def attention_implementation(self, spec: JobSpec) -> str | None:
        # The CPU SDPA kernel has no forward-mode derivative.
        return "eager" if spec.fwd.estimator == "jvp" else None

    def run_local(self, context: LocalContext) -> LocalResult:
        spec, task = context.spec, context.task
        result = forward_task(
            context.model,
            context.tokenizer,
            context.examples,
            spec,
            model_info(spec.model).task,
            round_=task.round,
            client=task.client,
            wave=task.wave,
            perturbations=task.perturbations or spec.fwd.perturbations_per_task,
            reference=_reference_gradient(context),
        )
        # The client moves its own personal part along its own estimate; only seeds go up.
        personal = {
            name: context.personal.get(name, context.start_state[name]) - spec.fwd.lr * step
            for name, step in result.local_step.items()
            if is_personal(spec, name)
        }
        return LocalResult(
            payload=result.payload,
            loss=result.loss,
            flops=result.flops,
            personal=personal,
            perturbations=result.perturbations,
            cosine=min(1.0, result.cosine),
        )

    def accumulator(self, spec: JobSpec, start_state: State) -> ForwardAccumulator:
        return ForwardAccumulator(spec, start_state)

    def observe(self, job_id: str, figures: Mapping[str, float]) -> None:
        FWD_PERTURBATIONS.observe(figures["perturbations"])
        FWD_VARIANCE.labels(job=job_id).set(figures["variance"])
        FWD_COSINE.labels(job=job_id).set(figures["cosine"])


def _reference_gradient(context: LocalContext) -> torch.Tensor | None:
    """The previous step's global gradient (flattened over the perturbed tensors), if any."""
    if not context.spec.fwd.discriminative or context.task.round < 2:
        return None
    gradient = context.artifact(GRADIENT, context.task.round - 1)
    if gradient is None:
        return None
    return ParamSpace.from_state(gradient).flatten(gradient)


# -- the worker side ----------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardResult:
    payload: bytes
    loss: float
    perturbations: int
    cosine: float
    flops: float
    """Compute spent: two forward passes' worth per perturbation (wireless cost model)."""
    local_step: dict[str, torch.Tensor]
    """This client's own gradient estimate per perturbed tensor (mean of g_i v_i): it moves the
    client's personal tensors locally, which never leave it."""


def candidate_count(spec: JobSpec, perturbations: int) -> int:
    """How many candidate seeds a task may choose from (the aggregator checks uploads against it)."""
    return perturbations * (spec.fwd.candidates if spec.fwd.discriminative else 1)


def forward_task(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    spec: JobSpec,
    task: Task,
    *,
    round_: int,
    client: int,
    wave: int,
    perturbations: int,
    reference: torch.Tensor | None,
) -> ForwardResult:
    device = next(model.parameters()).device
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    space = ParamSpace.from_state(params, spec.fwd.perturb)
    batch_seed = derive_seed("fwd-batch", spec.seed, round_, client, wave)
    batch = collate(tokenizer, next(minibatches(examples, spec.batch_size, batch_seed)), task, spec.max_length, device)

    seeds = [candidate_seed(spec.seed, round_, client, wave, i) for i in range(candidate_count(spec, perturbations))]
    usable_reference = reference if spec.fwd.discriminative else None
    chosen, cosines = select_directions(seeds, space.dim, usable_reference, perturbations)

    model.eval()  # the same network for every pass: no dropout
    loss_module = HeadLossOf(model, batch) if HeadLossOf.applies(model, task, space) else LossOf(model, task)
    grads: list[float] = []
    losses: list[float] = []
    dense = torch.zeros(space.dim, dtype=torch.float32)
    estimate = jvp_derivative if spec.fwd.estimator == "jvp" else central_difference
    for position in chosen:
        v = direction(seeds[position], space.dim)
        g, loss = estimate(loss_module, batch, params, space, v.to(device), spec.fwd.h)
        grads.append(g)
        losses.append(loss)
        dense += g * v

    if spec.fwd.upload == "dense":
        # Only the global part goes up; personal tensors stay on the client.
        shared = {name: t for name, t in space.unflatten(dense).items() if not is_personal(spec, name)}
        payload = encode_tensors(shared, spec.compression.dtype, spec.compression.zstd_level)
    else:
        payload = encode_seed_scalars(chosen, grads, losses)
    tokens = int(batch["attention_mask"].sum())
    return ForwardResult(
        payload=payload,
        loss=float(np.mean(losses)),
        perturbations=len(chosen),
        cosine=float(np.mean(np.abs(cosines))) if cosines else 0.0,
        flops=float(fwd_perturbation_flops(parameter_count(model), tokens) * len(chosen)),
        local_step={name: t.clone() for name, t in space.unflatten(dense / max(1, len(chosen))).items()},
    )


# -- the aggregator side ------------------------------------------------------------------


@dataclass(frozen=True)
class _Dense:
    estimate_sum: torch.Tensor


_Upload = SeedScalars | _Dense


class ForwardAccumulator(RoundAccumulator[_Upload]):
    """The round's gradient estimate: the mean of g_i v_i over every perturbation, streamed."""

    def __init__(self, spec: JobSpec, start_state: State) -> None:
        super().__init__(spec, start_state)
        self.space = ParamSpace.from_state(start_state, spec.fwd.perturb)
        self.estimate = ForwardGradientEstimate(self.space.dim)
        self.shared_names = {n for n in start_state if not is_personal(spec, n)}
        self.cosine_sum = 0.0
        self.updates = 0
        self.last_wave = 0

    def _validate(self, announce: UpdateReady, blob: bytes, max_bytes: int) -> _Upload:
        spec = self.spec
        if spec.fwd.upload == "dense":
            dense = decode_tensors(blob, max_bytes)
            check_matches(
                dense, {name: self.start_state[name] for name in self.space.names if name in self.shared_names}
            )
            full = {name: dense.get(name, torch.zeros_like(self.start_state[name])) for name in self.space.names}
            return _Dense(self.space.flatten(full))
        upload = decode_seed_scalars(blob)
        # The task's budget may be below the spec's (deadline budgets); never above it.
        k = announce.perturbations
        if not 1 <= k <= spec.fwd.perturbations_per_task:
            raise UploadError(f"{k} perturbations is outside 1..{spec.fwd.perturbations_per_task}")
        validate_upload(upload, expected_count=k, candidate_count=candidate_count(spec, k))
        return upload

    def merge(self, announce: UpdateReady, update: _Upload) -> None:
        if isinstance(update, _Dense):
            count = max(1, min(announce.perturbations, self.spec.fwd.perturbations_per_task))
            self.estimate.add_dense(update.estimate_sum, count, half_of(announce.client, announce.wave))
        else:
            indices, grads = update.indices.tolist(), update.grads.tolist()
            for index, g in zip(indices, grads, strict=True):
                seed = candidate_seed(self.spec.seed, announce.round, announce.client, announce.wave, index)
                self.estimate.add(g, direction(seed, self.space.dim), half_of(announce.client, index))
        self.cosine_sum += announce.cosine
        self.updates += 1
        self.last_wave = max(self.last_wave, announce.wave)

    def wants_more_work(self, force: bool) -> MoreWork | None:
        """Variance control: the estimate is still too noisy, and the step has budget left."""
        fwd = self.spec.fwd
        if force or fwd.variance_control != "adaptive":
            return None
        within_cap = self.estimate.count + fwd.perturbations_per_task <= fwd.max_perturbations_per_step
        variance = self.estimate.variance_ratio()
        if within_cap and variance > fwd.variance_threshold:
            return MoreWork(variance=variance, perturbations=self.estimate.count)
        return None

    def commit(self, state: State, previous: Callable[[str], State | None], round_: int) -> Step:
        """Server SGD on the estimate; only the global part moves (personal tensors move on their client)."""
        momentum = previous(MOMENTUM)
        if not self.updates:
            return Step(dict(state), {MOMENTUM: momentum} if momentum is not None else {})
        fwd = self.spec.fwd
        gradient = self.space.unflatten(self.estimate.mean())
        direction_ = dict(gradient)
        if fwd.momentum > 0:
            buffer = momentum or {name: torch.zeros_like(g) for name, g in gradient.items()}
            direction_ = {name: fwd.momentum * buffer[name] + g for name, g in gradient.items()}
        lr = fwd_learning_rate(self.spec, round_)
        new_state = {
            name: value - lr * direction_[name] if name in direction_ and name in self.shared_names else value
            for name, value in state.items()
        }
        figures = {
            "perturbations": float(self.estimate.count),
            "variance": self.estimate.variance_ratio(),
            "waves": float(self.last_wave + 1),
            "cosine": self.cosine_sum / max(1, self.updates),
            "lr": lr,
            "gradient_norm": float(self.estimate.mean().norm()),
        }
        artifacts = {GRADIENT: gradient}
        if fwd.momentum > 0:
            artifacts[MOMENTUM] = direction_
        return Step(new_state, artifacts, figures)


def fwd_learning_rate(spec: JobSpec, round_: int) -> float:
    fwd = spec.fwd
    if fwd.lr_schedule == "constant" or spec.rounds <= 1:
        return fwd.lr
    progress = (round_ - 1) / (spec.rounds - 1)
    return fwd.lr_min + 0.5 * (fwd.lr - fwd.lr_min) * (1 + math.cos(math.pi * progress))
