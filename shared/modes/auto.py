"""Mixed clients: each device trains with backprop if a backprop step fits its memory, else with forward gradients.

`mode: auto` is FwdLLM's use in a real fleet, where some phones are too small for backpropagation:
in the same round, the clients whose device memory (`devices`: `memory_mb`) holds a backprop
step of the job's model and batch run `local_steps` backprop steps (`optimizer`), the others run
`local_steps` local zeroth-order steps (`fwd`, as in `fwd.regime: local`) with inference memory
only. Both upload deltas of the global part — the forward clients as trajectories that the
aggregator replays — and one FedAvg merges them. The rule depends only on the spec, the client
and the round, so the aggregator knows which kind of upload to expect from whom.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.catalog import model_info
from shared.modes.backprop import BackpropMode, DeltaAccumulator
from shared.modes.base import LocalContext, LocalResult, State, TrainingMode
from shared.modes.fwd import ForwardMode, TrajectoryAccumulator, run_local_steps
from shared.wireless import round_profile

if TYPE_CHECKING:
    from shared.messages import UpdateReady
    from shared.spec import JobSpec

_BACKPROP = BackpropMode()
_FORWARD = ForwardMode()


def backprop_fits(spec: JobSpec, client: int, round_: int) -> bool:
    """Whether a backprop step of the job's model and batch fits this client's device memory this round."""
    profile = round_profile(spec.devices, spec.num_clients, spec.seed, client, round_)
    needed = model_info(spec.model).step_memory_mb(spec.batch_size * spec.max_length, backprop=True)
    return profile.memory_mb >= needed


class AutoMode(TrainingMode):
    name = "auto"

    def unit_flops(self, spec: JobSpec, params: int, tokens: int) -> float:
        # A unit is a local step either way; a backprop step is the dearer one (an upper estimate).
        return _BACKPROP.unit_flops(spec, params, tokens)

    def full_budget(self, spec: JobSpec) -> int:
        return spec.local_steps

    def task_fields(self, spec: JobSpec, budget: int) -> dict[str, int]:
        return {"local_steps": budget, "perturbations": spec.fwd.perturbations_per_local_step}

    def attention_implementation(self, spec: JobSpec) -> str | None:
        return _FORWARD.attention_implementation(spec)

    def run_local(self, context: LocalContext) -> LocalResult:
        if backprop_fits(context.spec, context.task.client, context.task.round):
            return _BACKPROP.run_local(context)
        return run_local_steps(context)

    def accumulator(self, spec: JobSpec, start_state: State) -> MixedAccumulator:
        return MixedAccumulator(spec, start_state)


class MixedAccumulator(TrajectoryAccumulator):
    """Backprop deltas from the clients that fit, replayed trajectories from the others: one FedAvg."""

    def _validate(self, announce: UpdateReady, blob: bytes, max_bytes: int) -> State:
        if backprop_fits(self.spec, announce.client, announce.round):
            return DeltaAccumulator._validate(self, announce, blob, max_bytes)
        return super()._validate(announce, blob, max_bytes)
