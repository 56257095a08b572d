"""A training mode written the way a new one would be: one module, one registry line.

`head-sgd` trains only the classifier head with plain SGD on one batch per step, uploads the
head's delta as float32, and the aggregator averages it uniformly and applies it at half
strength. It shares no code path with `backprop` beyond the interface.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shared.batches import collate, minibatches
from shared.codec import check_matches, decode_tensors, encode_tensors
from shared.messages import UpdateReady
from shared.modes.base import LocalContext, LocalResult, RoundAccumulator, State, Step, TrainingMode
from shared.seeding import derive_seed
from shared.spec import JobSpec


def _head(state: State) -> State:
    return {name: value for name, value in state.items() if "modules_to_save" in name}


class HeadSGDMode(TrainingMode):
    name = "head-sgd"

    def unit_flops(self, spec: JobSpec, params: int, tokens: int) -> float:
        return 2.0 * params * tokens

    def full_budget(self, spec: JobSpec) -> int:
        return spec.local_steps

    def task_fields(self, spec: JobSpec, budget: int) -> dict[str, int]:
        return {"local_steps": budget, "perturbations": 0}

    def run_local(self, context: LocalContext) -> LocalResult:
        spec, model = context.spec, context.model
        head = {name: p for name, p in model.named_parameters() if "modules_to_save" in name and p.requires_grad}
        optimizer = torch.optim.SGD(list(head.values()), lr=0.1)
        batches = minibatches(context.examples, spec.batch_size, derive_seed("head-sgd", spec.seed, context.task.round))
        losses = []
        for _ in range(context.task.local_steps):
            batch = collate(context.tokenizer, next(batches), "classification", spec.max_length)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        start = _head(context.start_state)
        delta = {name: head[name].detach().cpu() - value for name, value in start.items()}
        return LocalResult(payload=encode_tensors(delta, "float32"), loss=sum(losses) / len(losses), flops=1.0)

    def accumulator(self, spec: JobSpec, start_state: State) -> HeadAverage:
        return HeadAverage(spec, start_state)


class HeadAverage(RoundAccumulator[State]):
    def __init__(self, spec: JobSpec, start_state: State) -> None:
        super().__init__(spec, start_state)
        self.total: State = {}
        self.count = 0

    def _validate(self, announce: UpdateReady, blob: bytes, max_bytes: int) -> State:
        delta = decode_tensors(blob, max_bytes)
        check_matches(delta, _head(self.start_state))
        return delta

    def merge(self, announce: UpdateReady, update: State) -> None:
        for name, value in update.items():
            self.total[name] = self.total.get(name, torch.zeros_like(value)) + value
        self.count += 1

    def commit(self, state: State, previous: Callable[[str], State | None], round_: int) -> Step:
        moved = {name: state[name] + 0.5 * total / self.count for name, total in self.total.items()}
        return Step({**state, **moved}, figures={"head_updates": float(self.count)})
