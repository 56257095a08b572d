"""Forward gradients (FwdLLM): backprop-free local work, seed-scalar uploads, server SGD on the estimate.

A task evaluates K directions v (regenerated from seeds) with two inferences each (`fd`) or one
forward-mode pass (`jvp`), and uploads (seed index, g, loss) triples, or its dense sum of g v.
The aggregator regenerates the directions, averages g v over every perturbation of the round
with a split-half variance, asks for more waves while the estimate is too noisy (variance
control), and applies server SGD (optionally with momentum). The step's estimate is kept so the
next round's tasks can prefer directions aligned with it (discriminative sampling).
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from shared.batches import collate, minibatches
from shared.catalog import Task, model_info
from shared.codec import check_matches, decode_tensors, encode_tensors
from shared.forward_grad import (
    FLOAT16_MAX,
    ForwardGradientEstimate,
    ParamSpace,
    SeedScalars,
    TrajectoryStep,
    UploadError,
    as_wire_scalar,
    candidate_seed,
    debias_along,
    decode_pool,
    decode_seed_scalars,
    decode_trajectory,
    direction,
    encode_pool,
    encode_seed_scalars,
    encode_trajectory,
    half_of,
    local_seed,
    pool_directions,
    pool_seed,
    replay_pool,
    replay_trajectory,
    select_directions,
    validate_upload,
)
from shared.forward_passes import (
    HeadLossOf,
    LossOf,
    PoolerHeadLossOf,
    batched_central_difference,
    central_difference,
    jvp_derivative,
)
from shared.metrics import FWD_COSINE, FWD_PERTURBATIONS, FWD_VARIANCE
from shared.models import parameter_count, trainable_state
from shared.modes.backprop import DeltaAccumulator
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
        per_unit = spec.fwd.perturbations_per_local_step if _local(spec) else 1
        return float(fwd_perturbation_flops(params, tokens)) * per_unit

    def full_budget(self, spec: JobSpec) -> int:
        return spec.local_steps if _local(spec) else spec.fwd.perturbations_per_task

    def task_fields(self, spec: JobSpec, budget: int) -> dict[str, int]:
        if _local(spec):
            return {"local_steps": budget, "perturbations": spec.fwd.perturbations_per_local_step}
        return {"local_steps": spec.local_steps, "perturbations": budget}

    def wave_tasks(self, spec: JobSpec, clients: int, work_so_far: int) -> int:
        if _local(spec):
            return 0  # variance control works within each local step
        per_task = spec.fwd.perturbations_per_task
        return max(0, min(clients, (spec.fwd.max_perturbations_per_step - work_so_far) // per_task))

    def attention_implementation(self, spec: JobSpec) -> str | None:
        # The CPU SDPA kernel has no forward-mode derivative.
        return "eager" if spec.fwd.estimator == "jvp" else None

    def run_local(self, context: LocalContext) -> LocalResult:
        if _local(context.spec):
            return run_local_steps(context)
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

    def accumulator(self, spec: JobSpec, start_state: State) -> RoundAccumulator[Any]:
        if _local(spec):
            return TrajectoryAccumulator(spec, start_state)
        return ForwardAccumulator(spec, start_state)

    def observe(self, job_id: str, figures: Mapping[str, float]) -> None:
        FWD_PERTURBATIONS.observe(figures["perturbations"])
        FWD_VARIANCE.labels(job_id=job_id).set(figures["variance"])
        FWD_COSINE.labels(job_id=job_id).set(figures["cosine"])


def _local(spec: JobSpec) -> bool:
    return spec.fwd.regime == "local"


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
        self.seeds: list[int] = []  # every merged direction's seed: discriminative rounds debias with them
        self.dense_merged = False

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
            self.dense_merged = True
        else:
            indices, grads = update.indices.tolist(), update.grads.tolist()
            for index, g in zip(indices, grads, strict=True):
                seed = candidate_seed(self.spec.seed, announce.round, announce.client, announce.wave, index)
                self.estimate.add(g, direction(seed, self.space.dim), half_of(announce.client, index))
                self.seeds.append(seed)
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
        mean = self._debiased(self.estimate.mean(), previous(GRADIENT), round_)
        gradient = self.space.unflatten(mean)
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
            "gradient_norm": float(mean.norm()),
        }
        artifacts = {GRADIENT: gradient}
        if fwd.momentum > 0:
            artifacts[MOMENTUM] = direction_
        return Step(new_state, artifacts, figures)

    def _debiased(self, mean: torch.Tensor, reference: State | None, round_: int) -> torch.Tensor:
        """The round's estimate without discriminative sampling's stretch along the reference the tasks
        steered by (the previous round's gradient, as `_reference_gradient` gave it to them).

        Dense uploads carry no directions to measure the stretch on; they stay as merged.
        """
        if not self.spec.fwd.discriminative or round_ < 2 or reference is None or self.dense_merged:
            return mean
        unit = ParamSpace.from_state(reference).flatten(reference)
        if float(unit.norm()) == 0.0 or not self.seeds:
            return mean
        unit = unit / unit.norm()
        alignment = sum(float(direction(seed, self.space.dim) @ unit) ** 2 for seed in self.seeds) / len(self.seeds)
        return debias_along(mean, unit, alignment)


def fwd_learning_rate(spec: JobSpec, round_: int) -> float:
    """FedSGD: the server's learning rate in round `round_` (constant, or cosine from lr to lr_min)."""
    return _scheduled(spec, spec.fwd.lr, round_)


def local_learning_rate(spec: JobSpec, round_: int) -> float:
    """Local regime: the clients' SGD learning rate in round `round_` (constant, or cosine from local_lr to lr_min).

    Decaying it over the rounds is what lets non-iid clients settle: with a constant rate each
    round's local steps pull the heads apart by as much as the round before, and the average
    stalls about a point short of where it goes with the decay (README, "Local zeroth-order steps").
    """
    return _scheduled(spec, spec.fwd.local_lr, round_)


def _scheduled(spec: JobSpec, initial: float, round_: int) -> float:
    fwd = spec.fwd
    if fwd.lr_schedule == "constant" or spec.rounds <= 1:
        return initial
    progress = min(1.0, max(0.0, (round_ - 1) / (spec.rounds - 1)))
    return fwd.lr_min + 0.5 * (initial - fwd.lr_min) * (1 + math.cos(math.pi * progress))


# -- local zeroth-order steps (regime "local") ---------------------------------------------


def candidates_per_local_step(spec: JobSpec) -> int:
    """The candidate index space of one local step (the aggregator checks uploads against it)."""
    fwd = spec.fwd
    return fwd.max_perturbations_per_local_step * (fwd.candidates if fwd.discriminative else 1)


@dataclass(frozen=True)
class LocalSteps:
    steps: list[TrajectoryStep]
    losses: list[float]
    cosine: float
    flops: float
    coefficients: np.ndarray | None = None
    """Pool upload: the float16 coefficient of each pool seed (the client's delta is their sum)."""

    @property
    def perturbations(self) -> int:
        return sum(len(step) for step in self.steps)


class _LocalRun:
    """What the local steps of one task share: parameters, the perturbed space, minibatches, cached features."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: list[Example],
        spec: JobSpec,
        task: Task,
        seeds: tuple[int, int, int],
    ) -> None:
        round_, client, wave = seeds
        self.model, self.tokenizer, self.examples, self.spec, self.task = model, tokenizer, examples, spec, task
        self.device = next(model.parameters()).device
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.space = ParamSpace.from_state(self.params, spec.fwd.perturb)
        self.flops = 0.0
        self.cached: _ShardFeatures | None = None
        self.post_encoder: type[HeadLossOf] | type[PoolerHeadLossOf] | None = None
        if HeadLossOf.applies(model, task, self.space):
            self.post_encoder = HeadLossOf
        elif PoolerHeadLossOf.applies(model, task, self.space):
            self.post_encoder = PoolerHeadLossOf
        if self.post_encoder is not None:
            self.cached, encoded = _ShardFeatures.of(
                model, tokenizer, examples, spec, client, self.space, self.post_encoder
            )
            self.flops += 2.0 * parameter_count(model) * encoded  # one forward over the shard, unless cached
        self.pass_params = sum(math.prod(shape) for shape in self.space.shapes)
        if self.post_encoder is PoolerHeadLossOf:
            self.pass_params += sum(p.numel() for p in _pooler(model).parameters())
        seed = derive_seed("fwd-local-batch", spec.seed, round_, client, wave)
        self.positions = minibatches(range(len(examples)), spec.batch_size, seed)
        model.eval()  # the same network for every pass: no dropout

    def next_batch(self) -> tuple[dict[str, torch.Tensor], LossOf, float]:
        """The next minibatch, the loss module over it, and the FLOPs of one pass."""
        chosen = next(self.positions)
        if self.cached is not None:
            batch = {"labels": torch.tensor([self.examples[i].label for i in chosen], device=self.device)}
            features = self.cached.features[chosen]
            module: LossOf = (
                HeadLossOf(self.model, batch, features=features)
                if self.post_encoder is HeadLossOf
                else PoolerHeadLossOf(self.model, features)
            )
            return batch, module, 2.0 * self.pass_params * len(chosen)
        batch = collate(
            self.tokenizer, [self.examples[i] for i in chosen], self.task, self.spec.max_length, self.device
        )
        tokens = int(batch["attention_mask"].sum())
        return batch, LossOf(self.model, self.task), fwd_perturbation_flops(parameter_count(self.model), tokens) / 2

    def move(self, vector: torch.Tensor) -> None:
        with torch.no_grad():
            for name, piece in self.space.unflatten(vector).items():
                self.params[name].add_(piece.to(self.device, self.params[name].dtype))


def steered(spec: JobSpec, step: int) -> bool:
    """Whether local step `step` samples discriminatively (against the previous step's estimate)."""
    fwd = spec.fwd
    return fwd.discriminative and step % fwd.discriminative_every == fwd.discriminative_every - 1


def forward_local_steps(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    spec: JobSpec,
    task: Task,
    *,
    round_: int,
    client: int,
    wave: int,
    steps: int,
) -> LocalSteps:
    """`steps` zeroth-order SGD steps (with momentum) on the perturbed parameters, in place.

    Each step estimates the gradient on its own minibatch from directions regenerated from seeds;
    under adaptive variance control it keeps sampling directions until the split-half variance
    of the step's estimate is under the threshold or the step's cap is reached. Discriminative
    sampling prefers directions aligned with the client's previous local step.
    """
    if spec.fwd.upload == "pool":
        return _pool_local_steps(
            _LocalRun(model, tokenizer, examples, spec, task, (round_, client, wave)), steps, (round_, client, wave)
        )
    fwd = spec.fwd
    lr = local_learning_rate(spec, round_)
    run = _LocalRun(model, tokenizer, examples, spec, task, (round_, client, wave))
    buffer = torch.zeros(run.space.dim, dtype=torch.float32)
    reference: torch.Tensor | None = None
    record: list[TrajectoryStep] = []
    losses: list[float] = []
    cosines: list[float] = []
    for number in range(steps):
        batch, loss_module, pass_flops = run.next_batch()
        step = _one_local_step(
            loss_module,
            batch,
            run.params,
            run.space,
            spec,
            functools.partial(local_seed, spec.seed, round_, client, wave, number),
            reference if steered(spec, number) else None,
        )
        buffer = fwd.local_momentum * buffer + step.estimate
        run.move(buffer * -lr)
        record.append(TrajectoryStep(step.indices, step.grads, lr))
        losses.append(step.loss)
        cosines.extend(step.cosines)
        run.flops += 2 * pass_flops * len(step.indices)  # two passes per direction
        reference = step.estimate
    return LocalSteps(record, losses, float(np.mean(np.abs(cosines))) if cosines else 0.0, float(run.flops))


def _pool_local_steps(run: _LocalRun, steps: int, seeds: tuple[int, int, int]) -> LocalSteps:
    """Local steps whose directions all come from the task's pool of `fwd.seed_pool` seeds.

    The trajectory's delta is a weighted sum of the pool's directions, so the client uploads one
    coefficient per pool seed (float16) and ends at exactly the point the aggregator rebuilds.
    """
    spec, fwd = run.spec, run.spec.fwd
    round_, client, wave = seeds
    lr = local_learning_rate(spec, round_)
    directions = pool_directions(
        [pool_seed(spec.seed, round_, client, wave, i) for i in range(fwd.seed_pool)], run.space.dim
    )
    start = run.space.flatten({name: p.detach().cpu() for name, p in run.params.items() if name in run.space.names})
    per_step = min(fwd.perturbations_per_local_step, fwd.seed_pool)
    batched = run.post_encoder is HeadLossOf and fwd.estimator == "fd"
    directions_f64 = directions.double()  # every step's estimate is a float64 mix of the pool's rows
    estimate_fn = jvp_derivative if fwd.estimator == "jvp" else central_difference
    buffer = torch.zeros(run.space.dim, dtype=torch.float32)
    weights: list[np.ndarray] = []  # per step: each pool direction's share of that step's estimate
    losses: list[float] = []
    for number in range(steps):
        batch, loss_module, pass_flops = run.next_batch()
        rng = np.random.default_rng(derive_seed("pool-pick", spec.seed, round_, client, wave, number))
        chosen = (
            np.arange(fwd.seed_pool)
            if per_step == fwd.seed_pool
            else rng.choice(fwd.seed_pool, per_step, replace=False)
        )
        rows = directions if per_step == fwd.seed_pool else directions[torch.from_numpy(chosen)]
        if batched:
            grads, point = batched_central_difference(loss_module, batch, run.params, run.space, rows, fwd.h)  # type: ignore[arg-type]
        else:
            pairs = [estimate_fn(loss_module, batch, run.params, run.space, row.to(run.device), fwd.h) for row in rows]
            grads = torch.tensor([g for g, _ in pairs], dtype=torch.float64)
            point = torch.tensor([loss for _, loss in pairs], dtype=torch.float64)
        share = np.zeros(fwd.seed_pool)
        share[chosen] = grads.numpy() / len(chosen)
        weights.append(share)
        buffer = fwd.local_momentum * buffer + (torch.from_numpy(share) @ directions_f64).float()
        run.move(buffer * -lr)
        losses.append(float(point.mean()))
        run.flops += 2 * pass_flops * len(chosen)
    # Step j's estimate moves the point by -lr (1 + mu + ... + mu^(K-1-j)) through the momentum buffer.
    mu = fwd.local_momentum
    total = sum(-lr * sum(mu**k for k in range(steps - j)) * w for j, w in enumerate(weights))
    coefficients = np.clip(total, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
    end = start.double() + replay_pool(coefficients, directions)
    run.move(
        end.float() - run.space.flatten({n: p.detach().cpu() for n, p in run.params.items() if n in run.space.names})
    )
    return LocalSteps([], losses, 0.0, float(run.flops), coefficients=coefficients)


@dataclass(frozen=True)
class _StepEstimate:
    indices: np.ndarray
    grads: np.ndarray
    estimate: torch.Tensor
    loss: float
    cosines: list[float]


def _one_local_step(
    loss_module: LossOf,
    batch: dict[str, torch.Tensor],
    params: Mapping[str, torch.nn.Parameter],
    space: ParamSpace,
    spec: JobSpec,
    seed_of: Callable[[int], int],
    reference: torch.Tensor | None,
) -> _StepEstimate:
    fwd = spec.fwd
    per_chunk = fwd.perturbations_per_local_step
    spread = fwd.candidates if fwd.discriminative else 1
    estimate_fn = jvp_derivative if fwd.estimator == "jvp" else central_difference
    device = next(iter(params.values())).device
    running = ForwardGradientEstimate(space.dim)
    indices: list[int] = []
    grads: list[float] = []
    losses: list[float] = []
    cosines: list[float] = []
    unit = reference / reference.norm() if reference is not None and float(reference.norm()) > 0 else None
    alignment = 0.0  # sum of (v . r)^2 over the kept directions: their stretch along the reference
    for chunk in range(fwd.max_perturbations_per_local_step // per_chunk):
        offset = chunk * per_chunk * spread
        seeds = [seed_of(offset + i) for i in range(per_chunk * spread)]
        chosen, chunk_cosines = select_directions(seeds, space.dim, reference, per_chunk)
        cosines.extend(chunk_cosines if reference is not None else [])
        for position in chosen:
            v = direction(seeds[position], space.dim)
            g, loss = estimate_fn(loss_module, batch, params, space, v.to(device), fwd.h)
            g = as_wire_scalar(g)  # step with the value that travels, so the replay is exact
            running.add(g, v, half_of(0, offset + position))
            if unit is not None:
                alignment += float(v @ unit) ** 2
            indices.append(offset + position)
            grads.append(g)
            losses.append(loss)
        if fwd.variance_control != "adaptive" or running.variance_ratio() <= fwd.variance_threshold:
            break
    estimate = running.mean()
    if unit is not None and reference is not None:
        estimate = debias_along(estimate, reference, alignment / len(indices))
    return _StepEstimate(
        indices=np.asarray(indices, dtype=np.uint32),
        grads=np.asarray(grads, dtype=np.float16),
        estimate=estimate,
        loss=float(np.mean(losses)),
        cosines=cosines,
    )


def run_local_steps(context: LocalContext) -> LocalResult:
    spec, task = context.spec, context.task
    result = forward_local_steps(
        context.model,
        context.tokenizer,
        context.examples,
        spec,
        model_info(spec.model).task,
        round_=task.round,
        client=task.client,
        wave=task.wave,
        steps=task.local_steps,
    )
    after = trainable_state(context.model)
    if spec.fwd.upload == "dense":
        delta = {
            name: after[name] - value for name, value in context.start_state.items() if not is_personal(spec, name)
        }
        payload = encode_tensors(delta, spec.compression.dtype, spec.compression.zstd_level)
    elif result.coefficients is not None:
        payload = encode_pool(result.coefficients)
    else:
        payload = encode_trajectory(result.steps, result.losses)
    return LocalResult(
        payload=payload,
        loss=float(np.mean(result.losses)),
        flops=result.flops,
        personal={name: value for name, value in after.items() if is_personal(spec, name)},
        perturbations=result.perturbations,
        cosine=min(1.0, result.cosine),
    )


class TrajectoryAccumulator(DeltaAccumulator):
    """Local-regime uploads: each client's trajectory replayed into its delta, then merged like backprop's."""

    def __init__(self, spec: JobSpec, start_state: State) -> None:
        super().__init__(spec, start_state)
        self.space = ParamSpace.from_state(start_state, spec.fwd.perturb)

    def _validate(self, announce: UpdateReady, blob: bytes, max_bytes: int) -> State:
        spec = self.spec
        if spec.fwd.upload == "dense":
            return super()._validate(announce, blob, max_bytes)
        if spec.fwd.upload == "pool":
            coefficients = decode_pool(blob, spec.fwd.seed_pool)
            seeds = [
                pool_seed(spec.seed, announce.round, announce.client, announce.wave, i)
                for i in range(spec.fwd.seed_pool)
            ]
            return self._shared(replay_pool(coefficients, pool_directions(seeds, self.space.dim)))
        steps = decode_trajectory(
            blob,
            max_steps=spec.local_steps,
            max_per_step=spec.fwd.max_perturbations_per_local_step,
            candidates_per_step=candidates_per_local_step(spec),
        )
        if sum(len(step) for step in steps) != announce.perturbations:
            raise UploadError(
                f"the trajectory holds {sum(len(s) for s in steps)} perturbations, not {announce.perturbations}"
            )
        lr = local_learning_rate(spec, announce.round)
        if any(step.lr != lr for step in steps):
            raise UploadError(f"a step's learning rate is not the job's for round {announce.round} ({lr})")

        def seed_of(step: int, index: int) -> int:
            return local_seed(spec.seed, announce.round, announce.client, announce.wave, step, index)

        return self._shared(
            replay_trajectory(steps, seed_of, self.space.dim, spec.fwd.local_momentum, functools.partial(steered, spec))
        )

    def _shared(self, delta: torch.Tensor) -> State:
        """The replayed delta over the global part (zero for shared tensors that are not perturbed)."""
        moved = self.space.unflatten(delta)
        return {
            name: moved[name].to(torch.float32) if name in moved else torch.zeros_like(value)
            for name, value in self.shared_state.items()
        }


def _pooler(model: torch.nn.Module) -> torch.nn.Module:
    base: Any = model.get_base_model()  # type: ignore[operator]
    pooler: torch.nn.Module = getattr(base, base.base_model_prefix).pooler
    return pooler


class _ShardFeatures:
    """The frozen encoder's output for every example of a client's shard, computed once per worker.

    When only the head (or the pooler's LoRA and the head) is perturbed, what they read from the
    encoder never changes: not between perturbations, not between local steps, not between rounds
    (the tensors the encoder itself reads are not trained).
    The key includes a digest of those tensors, so a job that does train them never reads stale
    features.
    """

    _cache: ClassVar[OrderedDict[tuple[str, int, str], _ShardFeatures]] = OrderedDict()
    _lock: ClassVar[threading.Lock] = threading.Lock()
    LIMIT: ClassVar[int] = 4096

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        examples: list[Example],
        spec: JobSpec,
        client: int,
        space: ParamSpace,
        kind: type[HeadLossOf] | type[PoolerHeadLossOf],
    ) -> tuple[_ShardFeatures, int]:
        """The shard's features, and how many tokens were encoded to get them (0 when cached)."""
        digest = hashlib.sha256()
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad and name not in space.names:
                digest.update(param.detach().cpu().numpy().tobytes())
        shard = spec.model_dump_json(
            include={"model", "dataset", "partition", "num_clients", "seed", "max_length", "lora"}
        )
        key = (f"{kind.__name__}:{shard}", client, digest.hexdigest())
        with cls._lock:
            if key in cls._cache:
                cls._cache.move_to_end(key)
                return cls._cache[key], 0
        device = next(model.parameters()).device
        chunks, tokens = [], 0
        for start in range(0, len(examples), spec.batch_size):
            chunk = examples[start : start + spec.batch_size]
            batch = collate(tokenizer, chunk, "classification", spec.max_length, device)
            tokens += int(batch["attention_mask"].sum())
            chunks.append(kind.encode(model, batch))
        entry = cls(torch.cat(chunks))
        with cls._lock:
            cls._cache[key] = entry
            while len(cls._cache) > cls.LIMIT:
                cls._cache.popitem(last=False)
        return entry, tokens
