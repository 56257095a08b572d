"""Backprop: local optimizer steps on the LoRA (and head); uploads the delta of the global part.

The aggregator merges deltas with the job's aggregation strategy (FedAvg by default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from shared.aggregation import DeltaAggregate
from shared.batches import collate, minibatches
from shared.catalog import Task, model_info
from shared.codec import check_matches, decode_tensors, encode_tensors
from shared.models import GLOBAL_RNG_LOCK, parameter_count, trainable_state
from shared.modes.base import LocalContext, LocalResult, RoundAccumulator, State, Step, TrainingMode
from shared.personalization import is_personal
from shared.registry import STRATEGIES
from shared.seeding import derive_seed
from shared.wireless import backprop_step_flops

if TYPE_CHECKING:
    from shared.data import Example
    from shared.messages import UpdateReady
    from shared.spec import JobSpec


class BackpropMode(TrainingMode):
    name = "backprop"

    def unit_flops(self, spec: JobSpec, params: int, tokens: int) -> float:
        return float(backprop_step_flops(params, tokens))

    def full_budget(self, spec: JobSpec) -> int:
        return spec.local_steps

    def task_fields(self, spec: JobSpec, budget: int) -> dict[str, int]:
        return {"local_steps": budget, "perturbations": 0}

    def run_local(self, context: LocalContext) -> LocalResult:
        spec, task = context.spec, context.task
        seed = derive_seed("train", spec.seed, task.round, task.client)
        trained = train_backprop(
            context.model,
            context.tokenizer,
            context.examples,
            spec,
            model_info(spec.model).task,
            task.local_steps,
            seed,
        )
        after = trainable_state(context.model)
        delta = {
            name: after[name] - value for name, value in context.start_state.items() if not is_personal(spec, name)
        }
        return LocalResult(
            payload=encode_tensors(delta, spec.compression.dtype, spec.compression.zstd_level),
            loss=trained.loss,
            flops=trained.flops,
            personal={name: value for name, value in after.items() if is_personal(spec, name)},
        )

    def accumulator(self, spec: JobSpec, start_state: State) -> DeltaAccumulator:
        return DeltaAccumulator(spec, start_state)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean training loss over the local steps."""
    flops: float
    """Compute spent: ~3 forward passes' worth (forward + backward) per token, 2 FLOPs per parameter."""


def make_optimizer(spec: JobSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    opt = spec.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


def train_backprop(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    spec: JobSpec,
    task: Task,
    steps: int,
    seed: int,
) -> TrainResult:
    """`steps` local optimizer steps on the model's trainable parameters."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(spec, params)
    losses: list[float] = []
    tokens = 0
    batches = minibatches(examples, spec.batch_size, seed)
    # Dropout draws from torch's process-wide generator; embedded workers share one process.
    with GLOBAL_RNG_LOCK:
        torch.manual_seed(seed)
        model.train()
        for _ in range(steps):
            batch = collate(tokenizer, next(batches), task, spec.max_length, device)
            tokens += int(batch["attention_mask"].sum())
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.eval()
    return TrainResult(float(np.mean(losses)), float(backprop_step_flops(parameter_count(model), tokens)))


class DeltaAccumulator(RoundAccumulator[State]):
    """Deltas of the global part, merged by the job's aggregation strategy."""

    def __init__(self, spec: JobSpec, start_state: State) -> None:
        super().__init__(spec, start_state)
        self.strategy = STRATEGIES[spec.aggregation.strategy]
        self.aggregate: DeltaAggregate = self.strategy.start(spec)
        self.shared_state = {n: t for n, t in start_state.items() if not is_personal(spec, n)}

    def _validate(self, announce: UpdateReady, blob: bytes, max_bytes: int) -> State:
        delta = decode_tensors(blob, max_bytes)
        check_matches(delta, self.shared_state)
        return delta

    def weight(self, announce: UpdateReady) -> float:
        return float(announce.num_samples) if self.spec.aggregation.weighting == "samples" else 1.0

    def merge(self, announce: UpdateReady, update: State) -> None:
        self.aggregate.add(update, self.weight(announce))

    def commit(self, state: State, previous: Callable[[str], State | None], round_: int) -> Step:
        if not self.aggregate.count:
            return Step(dict(state))
        return Step(self.strategy.apply(self.spec, state, self.aggregate))
