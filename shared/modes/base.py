"""The training-mode interface: what the scheduler, the worker and the aggregator ask of a mode.

A mode (backprop, fwd, ...) is one module with one `TrainingMode` subclass, registered by
name in `shared.registry.MODES`. The services call these methods and never branch on the
mode's name:

- the scheduler sizes tasks: `unit_flops`, `full_budget`, `task_fields`, `wave_tasks`;
- a worker runs `run_local` on one client and uploads `LocalResult.payload`;
- the aggregator opens one `RoundAccumulator` per round (`accumulator`), which validates and
  merges uploads as they arrive, may ask for more work, and commits the round's new state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from shared.data import Example
    from shared.messages import TrainTask, UpdateReady
    from shared.spec import JobSpec

State = dict[str, torch.Tensor]
ArtifactLoader = Callable[[str, int], "State | None"]
"""(artifact name, round) -> the tensors a mode committed under that name at that round, if any."""


class UpdateRejected(ValueError):
    """An upload that cannot be merged (malformed, wrong shape, NaN, unknown seed, out of budget)."""


class TaskFailed(RuntimeError):
    """A task that cannot produce an update for reasons of its own (e.g. a reward model answered NaN).

    The worker dead-letters the task with this message; the round goes on without that client.
    """


@dataclass(frozen=True)
class LocalContext:
    """Everything a worker hands a mode for one client's task."""

    spec: JobSpec
    task: TrainTask
    model: torch.nn.Module
    """The job's PEFT model, already loaded with the global state plus this client's personal part."""
    tokenizer: PreTrainedTokenizerBase
    examples: list[Example]
    """The client's training shard."""
    start_state: State
    """The global trainable state the task starts from (committed at round - 1)."""
    personal: State
    """The client's personal tensors as it left them (empty before its first task)."""
    artifact: ArtifactLoader
    """Reads what the mode committed beside the global state in earlier rounds."""
    cache_dir: Path | None = None
    """The worker's model cache (reward models live there too); None: the settings' default."""
    round_uploads: Callable[[int], Mapping[int, bytes]] | None = None
    """Wave -> the uploads merged into this task's round in that wave, by client (each read from the
    store when first looked up): what the server broadcasts to the round's clients (secure
    aggregation's keys and encrypted shares)."""
    secrets: ClientSecrets | None = None
    """The client's own secrets (secure aggregation's private keys): stored under the client's key,
    never read by the aggregator."""


class ClientSecrets(Protocol):
    def get(self, name: str) -> bytes | None: ...

    def put(self, name: str, value: bytes) -> None: ...


@dataclass(frozen=True)
class LocalResult:
    payload: bytes
    """The upload: what the mode's accumulator validates and merges."""
    loss: float
    """Mean training loss of the task."""
    flops: float
    """Compute spent (the wireless cost model prices it)."""
    personal: State = field(default_factory=dict)
    """The client's personal tensors after the task; stored for its next task, never uploaded."""
    perturbations: int = 0
    """Directions evaluated (forward-gradient modes)."""
    cosine: float = 0.0
    """Mean |cosine| of the chosen directions with the reference gradient (forward-gradient modes)."""


@dataclass(frozen=True)
class EvaluationContext:
    """What a worker hands a mode to evaluate one client after a round."""

    spec: JobSpec
    job_id: str
    round: int
    client: int
    model: torch.nn.Module
    """The job's PEFT model; `evaluate_client` leaves the client's personalized state loaded in it."""
    tokenizer: PreTrainedTokenizerBase
    global_state: State
    personal: State
    """The client's personal tensors (empty when nothing is personal or it never trained)."""
    cache_dir: Path | None = None
    """The worker's model cache; None: the settings' default."""


@dataclass(frozen=True)
class ClientEvaluation:
    figures: dict[str, float]
    """global_* and personalized_* figures (and any the mode adds), all finite or NaN floats."""
    samples: list[dict[str, str]] = field(default_factory=list)
    """A few examples a person can read (align: prompts and the models' responses)."""


@dataclass(frozen=True)
class MoreWork:
    """An accumulator's request for another wave of tasks in the same round."""

    variance: float
    perturbations: int


@dataclass(frozen=True)
class Step:
    """A committed round: the new global state, what the mode keeps beside it, and figures to report."""

    state: State
    artifacts: dict[str, State] = field(default_factory=dict)
    """Named tensors stored with the round (e.g. fwd's gradient estimate and server momentum)."""
    figures: dict[str, float] = field(default_factory=dict)
    clients: list[int] | None = None
    """The clients the new state is built on, when not every client that uploaded something this
    round (secure aggregation: the survivors, not those that only advertised keys or abstained)."""


U = TypeVar("U")


class RoundAccumulator(ABC, Generic[U]):
    """One round's running aggregate: O(model) memory, whatever the number of clients.

    Parameters
    ----------
    spec : JobSpec
        The job.
    start_state : State
        The global trainable state the round's tasks started from.
    """

    closes_waves: ClassVar[bool] = False
    """An upload of a wave before the round's current one is late and dropped (True: each wave's
    set of uploads is fixed once the next wave is asked for, as secure aggregation needs)."""

    def __init__(self, spec: JobSpec, start_state: State) -> None:
        self.spec = spec
        self.start_state = start_state

    def validate(self, announce: UpdateReady, blob: bytes, max_bytes: int) -> U:
        """Decode and check an upload completely, before anything is merged.

        Returns
        -------
        U
            The decoded update, to pass to `merge`.

        Raises
        ------
        UpdateRejected
            If the upload can never be merged.
        """
        try:
            return self._validate(announce, blob, max_bytes)
        except ValueError as error:  # CodecError, UploadError and shape checks are ValueErrors
            raise UpdateRejected(str(error)) from None

    @abstractmethod
    def _validate(self, announce: UpdateReady, blob: bytes, max_bytes: int) -> U: ...

    @abstractmethod
    def merge(self, announce: UpdateReady, update: U) -> None:
        """Add one validated update to the running aggregate. Never fails for a validated update."""

    def weight(self, announce: UpdateReady) -> float:
        """The update's weight in the round's mean training loss."""
        return 1.0

    def wants_more_work(self, force: bool) -> MoreWork | None:
        """Whether the round should get another wave of tasks before it commits (`force`: never)."""
        return None

    @abstractmethod
    def commit(self, state: State, previous: Callable[[str], State | None], round_: int) -> Step:
        """The round's new global state from everything merged.

        Parameters
        ----------
        state : State
            The global state committed at `round_ - 1`.
        previous : callable
            Artifact name -> what the mode stored under it at `round_ - 1`, if anything.
        round_ : int
            The round being committed.
        """


class TrainingMode(ABC):
    """A way of training a client, with its three sides (scheduler, worker, aggregator)."""

    name: ClassVar[str]
    artifacts: ClassVar[tuple[str, ...]] = ()
    """Names of what `RoundAccumulator.commit` stores beside the global state (pruned after two rounds)."""

    # -- scheduler side -------------------------------------------------------------------

    @abstractmethod
    def unit_flops(self, spec: JobSpec, params: int, tokens: int) -> float:
        """FLOPs of one unit of local work (a step, a perturbation) over `tokens` tokens."""

    @abstractmethod
    def full_budget(self, spec: JobSpec) -> int:
        """Units of local work a task gets when no deadline budget cuts it."""

    @abstractmethod
    def task_fields(self, spec: JobSpec, budget: int) -> dict[str, int]:
        """The `TrainTask` fields that carry a budget of `budget` units."""

    def wave_tasks(self, spec: JobSpec, clients: int, work_so_far: int) -> int:
        """How many tasks another wave of the same round may have (0: none, close the round)."""
        return 0

    # -- worker side ----------------------------------------------------------------------

    @abstractmethod
    def run_local(self, context: LocalContext) -> LocalResult:
        """Train one client for one task and return its upload."""

    def evaluate_client(self, context: EvaluationContext) -> ClientEvaluation:
        """The global vs the personalized model on the client's held-out examples: accuracy and loss."""
        from shared import data
        from shared.catalog import model_info
        from shared.evaluation import evaluate
        from shared.models import load_trainable_state

        spec = context.spec
        examples = data.client_test_examples(spec, context.client, spec.personalization.eval_examples_per_client)
        task_kind = model_info(spec.model).task
        load_trainable_state(context.model, context.global_state)
        global_figures = evaluate(context.model, context.tokenizer, examples, task_kind, spec.max_length)
        personal_figures = global_figures  # with nothing personal, the client's model is the global one
        if context.personal:
            load_trainable_state(context.model, {**context.global_state, **context.personal})
            personal_figures = evaluate(context.model, context.tokenizer, examples, task_kind, spec.max_length)
        return ClientEvaluation(
            {
                "global_accuracy": global_figures["accuracy"],
                "global_loss": global_figures["loss"],
                "personalized_accuracy": personal_figures["accuracy"],
                "personalized_loss": personal_figures["loss"],
                "examples": float(len(examples)),
            }
        )

    def attention_implementation(self, spec: JobSpec) -> str | None:
        """An attention kernel the mode needs (e.g. "eager" for forward-mode AD), or None for the default."""
        return None

    # -- aggregator side ------------------------------------------------------------------

    @abstractmethod
    def accumulator(self, spec: JobSpec, start_state: State) -> RoundAccumulator[Any]:
        """A fresh aggregate for one round."""

    def observe(self, job_id: str, figures: Mapping[str, float]) -> None:
        """Export a committed round's mode-specific figures (Prometheus); nothing by default."""
        return None
