"""Local training of one client: backprop LoRA (the forward-gradient mode slots in beside it)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from shared.batches import Task, collate
from shared.data import Example
from shared.models import GLOBAL_RNG_LOCK, parameter_count
from shared.spec import JobSpec
from shared.wireless import backprop_step_flops


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean training loss over the local steps."""
    num_samples: int
    """Distinct examples the client holds (the FedAvg weight)."""
    examples_seen: int
    flops: float
    """Compute spent: ~3 forward passes' worth (forward + backward) per token, 2 FLOPs per parameter."""


def minibatches(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless shuffled minibatches: a fresh permutation each pass over the client's data."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(examples))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if len(chunk) < min(batch_size, len(order)):
                break  # keep batch shapes constant; the tail joins the next pass
            yield [examples[i] for i in chunk]


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
    return TrainResult(
        loss=float(np.mean(losses)),
        num_samples=len(examples),
        examples_seen=steps * spec.batch_size,
        flops=float(backprop_step_flops(parameter_count(model), tokens)),
    )
