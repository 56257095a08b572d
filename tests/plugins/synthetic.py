"""A synthetic training mode for the soak: no training, a seeded random delta of the real size.

`synthetic` is backprop with `run_local` replaced: every task uploads a delta of the job's global
part (MiniLM-L6's LoRA r=8 + head: 75,653 values, ~151 KB in float16) drawn from a generator
seeded by (job seed, round, client), through the job's own upload codec. Everything else (the
scheduler's budgets, the worker's state handling, the aggregator's validation, FedAvg, commits) is
backprop's unchanged code, so a soak exercises the real paths at many clients without paying for
training. Whoever knows the seeds recomputes every delta, hence the exact mean a round must commit.

Registered in a service process by `tests.plugins.launch` (the services themselves are unchanged).
"""

from __future__ import annotations

import time

import torch

from shared.codec import Codec, encode_update
from shared.models import load_trainable_state
from shared.modes.backprop import BackpropMode, codec_seed
from shared.modes.base import ClientEvaluation, EvaluationContext, LocalContext, LocalResult, State
from shared.personalization import is_personal
from shared.seeding import derive_seed
from shared.spec import JobSpec

DELTA_SCALE = 1e-3
"""Standard deviation of a synthetic delta's entries: LoRA deltas after a few steps are this small."""


def synthetic_delta(spec: JobSpec, shapes: dict[str, tuple[int, ...]], round_: int, client: int) -> State:
    """The delta `client` uploads in `round_`: float16-representable, so a float16 upload is lossless."""
    generator = torch.Generator().manual_seed(derive_seed("synthetic", spec.seed, round_, client))
    return {
        name: (torch.randn(shape, generator=generator) * DELTA_SCALE).to(torch.float16).to(torch.float32)
        for name, shape in sorted(shapes.items())
    }


def shared_shapes(spec: JobSpec, state: State) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the global (aggregated) part of a trainable state."""
    return {name: tuple(value.shape) for name, value in state.items() if not is_personal(spec, name)}


class SyntheticMode(BackpropMode):
    name = "synthetic"

    def run_local(self, context: LocalContext) -> LocalResult:
        spec, task = context.spec, context.task
        began = time.perf_counter()
        delta = synthetic_delta(spec, shared_shapes(spec, context.start_state), task.round, task.client)
        encoded = encode_update(delta, Codec.for_uploads(spec.compression), codec_seed(spec, task))
        # The loss is a fixed function of the task, so the round's mean training loss is checkable too.
        loss = 1.0 + task.client / max(1, spec.num_clients)
        return LocalResult(payload=encoded.blob, loss=loss, flops=float(time.perf_counter() - began) * 1e9)

    def evaluate_client(self, context: EvaluationContext) -> ClientEvaluation:
        """No model run (the deltas are noise); the client's model is still loaded, for the worker to publish."""
        load_trainable_state(context.model, {**context.global_state, **context.personal})
        figures = {"accuracy": 0.0, "loss": 0.0}
        return ClientEvaluation(
            {
                **{f"global_{name}": value for name, value in figures.items()},
                **{f"personalized_{name}": value for name, value in figures.items()},
                "examples": 0.0,
            }
        )
