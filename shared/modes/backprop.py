"""Backprop: local optimizer steps on the LoRA (and head); uploads the delta of the global part.

The delta goes through the job's upload codec (`shared.codec`: a float cast, block-wise int8 or
4-bit quantization with stochastic rounding, top-k sparsification), seeded from (job seed, round,
client, wave) so every process encodes the same task into the same bytes. With error feedback the
client keeps the residual of what its codec did not send and adds it to its next delta; the residual
travels as client-side state beside its personal tensors (`shared.codec.RESIDUAL_PREFIX` names, which
the worker stores apart and never loads into the model). The aggregator validates uploads through the codec and
merges them with the job's aggregation strategy (FedAvg by default).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from shared.aggregation import DeltaAggregate
from shared.batches import collate, minibatches
from shared.catalog import Task, model_info
from shared.codec import (
    RESIDUAL_PREFIX,
    Codec,
    Encoded,
    decode_update,
    encode_tensors,
    encode_update,
    split_residual,
)
from shared.models import GLOBAL_RNG_LOCK, parameter_count
from shared.modes.base import LocalContext, LocalResult, RoundAccumulator, State, Step, TrainingMode
from shared.personalization import is_personal
from shared.registry import STRATEGIES
from shared.robust import poison_delta, poisoned_clients
from shared.seeding import derive_seed
from shared.wireless import backprop_step_flops

if TYPE_CHECKING:
    from shared.data import Example
    from shared.messages import TrainTask, UpdateReady
    from shared.spec import JobSpec


def codec_seed(spec: JobSpec, task: TrainTask) -> int:
    """The stochastic-rounding seed of one task's upload."""
    return derive_seed("codec", spec.seed, task.round, task.client, task.wave)


class BackpropMode(TrainingMode):
    name = "backprop"

    def unit_flops(self, spec: JobSpec, params: int, tokens: int) -> float:
        # Weight gradients for every base weight only in full fine-tuning; a LoRA's (and the head's)
        # share of the parameters is left out, as the forward count leaves their FLOPs out.
        return float(backprop_step_flops(params, tokens, params if spec.lora.full else 0))

    def full_budget(self, spec: JobSpec) -> int:
        return spec.local_steps

    def task_fields(self, spec: JobSpec, budget: int) -> dict[str, int]:
        return {"local_steps": budget, "perturbations": 0}

    def wave_tasks(self, spec: JobSpec, clients: int, work_so_far: int) -> int:
        # A secure round's mask and unmask waves go to every client of the round (shared.modes.secure).
        return clients if spec.secure_aggregation.enabled else 0

    def run_local(self, context: LocalContext) -> LocalResult:
        if context.spec.secure_aggregation.enabled:
            from shared.modes.secure import run_secure_task  # it builds on this module

            return run_secure_task(context)
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
            shard=SHARDS.get((task.job_id, task.client), context.tokenizer, context.examples, spec.max_length),
        )
        _, residual = split_residual(context.personal)
        payload, personal = upload_from_model(context, residual)
        return LocalResult(payload=payload, loss=trained.loss, flops=trained.flops, personal=personal)

    def accumulator(self, spec: JobSpec, start_state: State) -> RoundAccumulator[Any]:
        if spec.secure_aggregation.enabled:
            from shared.modes.secure import SecureAccumulator

            return SecureAccumulator(spec, start_state)
        return DeltaAccumulator(spec, start_state)


def upload_from_model(context: LocalContext, residual: State) -> tuple[bytes, State]:
    """The delta of the global part, through the job's codec, and the client's personal tensors after the task.

    Straight from the model's parameters: one new tensor per name, no full copy of the trained state.
    With error feedback, `residual` (what the codec did not send last time) is added first and the new
    residual returned among the personal tensors (`RESIDUAL_PREFIX` names, stored apart by the worker).
    """
    encoded, personal = encode_delta(context, residual, codec_seed(context.spec, context.task))
    return encoded.blob, personal


def encode_delta(context: LocalContext, residual: State, seed: int) -> tuple[Encoded, State]:
    """`upload_from_model`'s codec output (bytes and the decoded values) and personal tensors;
    `seed` seeds the codec's stochastic rounding."""
    spec = context.spec
    delta: State = {}
    personal: State = {}
    with torch.no_grad():
        for name, param in context.model.named_parameters():
            if not param.requires_grad:
                continue
            if is_personal(spec, name):
                personal[name] = param.detach().to("cpu", torch.float32, copy=True)
            else:
                delta[name] = param.detach().to("cpu", torch.float32) - context.start_state[name]
    task = context.task
    if spec.simulation.poison.fraction > 0 and task.client in poisoned_clients(spec):
        # Test/benchmark simulation: a bad client. Dense float32, so even NaN reaches the aggregator.
        poisoned = poison_delta(spec, delta, derive_seed("poison", spec.seed, task.round, task.client, task.wave))
        return Encoded(blob=encode_tensors(poisoned, "float32"), decoded=poisoned), personal
    if spec.compression.error_feedback:
        for name, value in residual.items():
            if name in delta:
                delta[name] += value
    encoded = encode_update(delta, Codec.for_uploads(spec.compression), seed)
    if spec.compression.error_feedback:
        personal.update({RESIDUAL_PREFIX + name: delta[name] - encoded.decoded[name] for name in delta})
    return encoded, personal


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean training loss over the local steps."""
    flops: float
    """Compute spent (`shared.wireless.backprop_step_flops`): forward, activation gradients, and weight
    gradients of the trainable parameters."""


def make_optimizer(spec: JobSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    opt = spec.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


class TokenizedShard:
    """A client's examples, each tokenized at most once (lazily: a task tokenizes only what it draws).

    `batch(indices)` pads to the longest example exactly as `shared.batches.collate` does, so a
    cached shard trains bit for bit like an uncached one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int) -> None:
        self.tokenizer = tokenizer
        self.examples = examples
        self.max_length = max_length
        self._encoded: dict[int, dict[str, list[int]]] = {}
        self._lock = threading.Lock()

    def _encode(self, indices: Sequence[int]) -> list[dict[str, list[int]]]:
        with self._lock:
            todo = sorted({i for i in indices if i not in self._encoded})
            if todo:
                encoded = self.tokenizer(
                    [self.examples[i].text for i in todo], truncation=True, max_length=self.max_length
                )
                keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
                for row, index in enumerate(todo):
                    self._encoded[index] = {k: list(encoded[k][row]) for k in keys}
            return [self._encoded[i] for i in indices]

    def batch(self, indices: Sequence[int], task: Task, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        rows = self._encode(indices)
        length = max(len(row["input_ids"]) for row in rows)
        pad_values = {
            "input_ids": self.tokenizer.pad_token_id,
            "attention_mask": 0,
            "token_type_ids": self.tokenizer.pad_token_type_id,
        }
        left = self.tokenizer.padding_side == "left"
        batch: dict[str, torch.Tensor] = {}
        for key in rows[0]:
            padded = []
            for row in rows:
                fill = [pad_values[key]] * (length - len(row[key]))
                padded.append(fill + row[key] if left else row[key] + fill)
            batch[key] = torch.tensor(padded, dtype=torch.long, device=device)
        if task == "classification":
            labels = [self.examples[i].label for i in indices]
            batch["labels"] = torch.tensor(labels, dtype=torch.long, device=device)
        else:
            labels_lm = batch["input_ids"].clone()
            labels_lm[batch["attention_mask"] == 0] = -100  # padding is not a prediction target
            batch["labels"] = labels_lm
        return batch


class ShardCache:
    """Tokenized shards by (job, client), kept per process (so per worker) while they are in use."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._shards: OrderedDict[tuple[Any, ...], TokenizedShard] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, key: tuple[str, int], tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
    ) -> TokenizedShard:
        full_key = (*key, id(tokenizer), max_length, len(examples))
        with self._lock:
            shard = self._shards.get(full_key)
            if shard is None or shard.tokenizer is not tokenizer:
                shard = TokenizedShard(tokenizer, examples, max_length)
                self._shards[full_key] = shard
            self._shards.move_to_end(full_key)
            while len(self._shards) > self.capacity:
                self._shards.popitem(last=False)
            return shard

    def clear(self) -> None:
        with self._lock:
            self._shards.clear()


SHARDS = ShardCache()


def train_backprop(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    spec: JobSpec,
    task: Task,
    steps: int,
    seed: int,
    shard: TokenizedShard | None = None,
) -> TrainResult:
    """`steps` local optimizer steps on the model's trainable parameters (`shard`: the examples pre-tokenized)."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(spec, params)
    losses: list[float] = []
    tokens = 0
    batches = minibatches(range(len(examples)), spec.batch_size, seed)
    # Dropout draws from torch's process-wide generator; embedded workers share one process.
    with GLOBAL_RNG_LOCK:
        torch.manual_seed(seed)
        model.train()
        for _ in range(steps):
            indices = next(batches)
            if shard is not None:
                batch = shard.batch(indices, task, device)
            else:
                batch = collate(tokenizer, [examples[i] for i in indices], task, spec.max_length, device)
            tokens += int(batch["attention_mask"].sum())
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.eval()
    trainable = sum(p.numel() for p in params)
    return TrainResult(float(np.mean(losses)), float(backprop_step_flops(parameter_count(model), tokens, trainable)))


class DeltaAccumulator(RoundAccumulator[State]):
    """Deltas of the global part, decoded and checked by the codec, merged by the job's aggregation strategy."""

    def __init__(self, spec: JobSpec, start_state: State) -> None:
        super().__init__(spec, start_state)
        self.strategy = STRATEGIES[spec.aggregation.strategy]
        self.aggregate: DeltaAggregate = self.strategy.start(spec)
        self.shared_state = {n: t for n, t in start_state.items() if not is_personal(spec, n)}

    def _validate(self, announce: UpdateReady, blob: bytes, max_bytes: int) -> State:
        # The header is checked against the global part's names and shapes before any tensor is built.
        tensors = decode_update(blob, max_bytes, expected=self.shared_state).tensors
        # The strategy's own checks (NaN/Inf, a buffered strategy's memory bound) reject here, before merging.
        self.aggregate.check(tensors)
        return tensors

    def weight(self, announce: UpdateReady) -> float:
        return float(announce.num_samples) if self.spec.aggregation.weighting == "samples" else 1.0

    def merge(self, announce: UpdateReady, update: State) -> None:
        self.aggregate.add(update, self.weight(announce))

    def commit(self, state: State, previous: Callable[[str], State | None], round_: int) -> Step:
        if not self.aggregate.count:
            return Step(dict(state))
        return Step(self.strategy.apply(self.spec, state, self.aggregate))
