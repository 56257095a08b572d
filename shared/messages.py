"""Bus messages: small, versioned msgpack maps validated on receipt.

Tensors never travel inside a message: a message names the store key that holds them.
Every message carries `v` (schema version) and `type`; anything that does not
validate is an `InvalidMessage`, which the bus dead-letters instead of retrying.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

SCHEMA_VERSION: Literal[1] = 1
JOB_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,63}$"


class InvalidMessage(ValueError):
    """A message that can never be processed: wrong shape, wrong version, too large."""


class Verifier(Protocol):
    """Checks a message's seals and strips them (`shared.signing.BusAuth`); raises InvalidMessage if they fail."""

    def verify(self, data: dict[str, Any]) -> dict[str, Any]: ...


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = SCHEMA_VERSION


JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN)]
Round = Annotated[int, Field(ge=0, le=1_000_000)]
ClientId = Annotated[int, Field(ge=0, le=1_000_000)]


# --- scheduler -> workers (task queue) -------------------------------------------------------


MAX_CLIENTS_PER_TASK = 1000
"""The most clients one batched TrainTask may carry (`JobSpec.clients_per_task`)."""


class TrainTask(_Message):
    """Train one client for one round, starting from the global state committed at `round - 1`.

    A batch (`clients`, pool clients only) trains several clients one after another in one message,
    each exactly as its own task would, with the same budget: it saves the broker round trip and
    the per-task setup that dominate a task of a few examples (FwdLLM's many-client regime).
    """

    type: Literal["train"] = "train"
    job_id: JobId
    round: Round
    client: ClientId
    clients: list[ClientId] = Field(
        default_factory=list,
        max_length=MAX_CLIENTS_PER_TASK,
        description="a batch: the clients to train one after another, `client` first, no repeats; empty: `client` "
        "alone (the field is left off the wire then, so a single-client task reads as it always did)",
    )
    attempt: int = Field(0, ge=0, le=1000)
    wave: int = Field(0, ge=0, le=10_000, description="fwd: extra perturbation work within the same step")
    local_steps: int = Field(ge=1, le=1_000_000, description="backprop budget: local optimizer steps")
    perturbations: int = Field(0, ge=0, le=100_000, description="fwd budget: directions to evaluate")
    signature: str = Field(
        "", max_length=128, description="bound clients: the scheduler's signature of every other field"
    )

    @model_validator(mode="after")
    def _batch_starts_with_client(self) -> TrainTask:
        if self.clients:
            if self.clients[0] != self.client:
                raise ValueError(f"a batch's clients start with its client {self.client}, not {self.clients[0]}")
            if len(set(self.clients)) != len(self.clients):
                raise ValueError("a batch names a client twice")
            if self.signature:
                raise ValueError("a batch is for pool clients only: it carries no signature")
        return self

    @model_serializer(mode="wrap")
    def _without_empty_batch(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        # A single-client task is serialized (sent, signed) exactly as before batches existed: a worker of
        # an earlier version, which forbids unknown fields, still reads it, and bound tasks' signatures
        # cover the same fields.
        data: dict[str, Any] = handler(self)
        if not self.clients:
            data.pop("clients", None)
        return data

    @property
    def batch(self) -> list[int]:
        """The clients this task trains, in order: its batch, or its one client."""
        return list(self.clients) if self.clients else [self.client]

    def for_client(self, client: int) -> TrainTask:
        """The single-client task of one client of this batch (what the scheduler would send unbatched)."""
        return self.model_copy(update={"client": client, "clients": []})


class EvaluateTask(_Message):
    """Evaluate one client's global and personalized models after `round`; publish the latter if asked.

    Runs on the client side (a worker) because the personalized model includes the client's
    personal tensors, which the aggregator never sees.
    """

    type: Literal["evaluate"] = "evaluate"
    job_id: JobId
    round: Round
    client: ClientId
    publish: bool = False
    signature: str = Field(
        "", max_length=128, description="bound clients: the scheduler's signature of every other field"
    )


# --- workers and scheduler -> aggregator (aggregate queue) ----------------------------------


class UpdateReady(_Message):
    """A worker stored a client's update under `key`; the aggregator merges it at most once."""

    type: Literal["update"] = "update"
    job_id: JobId
    round: Round
    client: ClientId
    attempt: int = Field(ge=0, le=1000)
    wave: int = Field(0, ge=0, le=10_000)
    key: str = Field(min_length=1, max_length=512)
    num_samples: int = Field(ge=1, le=1_000_000_000)
    train_loss: float
    compute_s: float = Field(ge=0)
    upload_bytes: int = Field(ge=0)
    perturbations: int = Field(0, ge=0, description="fwd: directions evaluated")
    flops: float = Field(0.0, ge=0, description="compute spent on the task (wireless cost model)")
    cosine: float = Field(0.0, ge=-1, le=1, description="fwd: mean |cosine| of the chosen directions")
    digest: str = Field(
        "",
        pattern=r"^([0-9a-f]{64})?$",
        description="SHA-256 (hex) of the blob under `key`: binds the stored update to this announcement (under "
        "its MAC, and a bound client's signature); the aggregator merges no blob that does not match it",
    )
    signature: str = Field(
        "", max_length=128, description="bound clients: the client's Ed25519 signature of every other field"
    )


class InitJob(_Message):
    """Create the initial global state (round 0) of a job and evaluate it."""

    type: Literal["init"] = "init"
    job_id: JobId


class CloseRound(_Message):
    """Commit a round from the updates merged so far; later updates for it are late."""

    type: Literal["close"] = "close"
    job_id: JobId
    round: Round
    force: bool = Field(False, description="commit even if the fwd variance is above its threshold")


class DropJob(_Message):
    """Forget in-flight aggregation state of a cancelled or failed job."""

    type: Literal["drop"] = "drop"
    job_id: JobId


# --- aggregator -> scheduler (event queue) ---------------------------------------------------


class JobInitialized(_Message):
    type: Literal["initialized"] = "initialized"
    job_id: JobId
    metrics: dict[str, float]


class UpdateMerged(_Message):
    type: Literal["merged"] = "merged"
    job_id: JobId
    round: Round
    client: ClientId
    merged_count: int = Field(ge=1)
    rejected_count: int = Field(0, ge=0)
    """Updates of the round rejected so far: they will not come, so the round may close without them."""


class UpdateInvalid(_Message):
    """A sampled client's upload that can never be merged (NaN/Inf, malformed, over a bound): the round
    closes once every other update is in, from the valid ones."""

    type: Literal["invalid"] = "invalid"
    job_id: JobId
    round: Round
    client: ClientId
    merged_count: int = Field(ge=0)
    rejected_count: int = Field(ge=1)
    reason: str = Field(max_length=1000)


class MoreWork(_Message):
    """fwd: the step's gradient estimate is still too noisy; the scheduler dispatches another wave."""

    type: Literal["more"] = "more"
    job_id: JobId
    round: Round
    wave: int = Field(ge=1)
    variance: float
    perturbations: int = Field(ge=0)


class RoundCommitted(_Message):
    type: Literal["committed"] = "committed"
    job_id: JobId
    round: Round
    clients: list[int]
    metrics: dict[str, float]


class ClientEvaluated(_Message):
    """A client's held-out figures after a round: the global model vs its personalized model."""

    type: Literal["client-evaluated"] = "client-evaluated"
    job_id: JobId
    round: Round
    client: ClientId
    metrics: dict[str, float]
    samples: list[dict[str, Annotated[str, Field(max_length=1000)]]] = Field(default_factory=list, max_length=32)
    """A few responses a person can read (align mode): prompt, global and personalized answers."""
    signature: str = Field("", max_length=128, description="bound clients: the client's signature of every other field")


class JobFailed(_Message):
    """Something the aggregator cannot recover from (e.g. a model that does not load)."""

    type: Literal["failed"] = "failed"
    job_id: JobId
    error: str = Field(max_length=4000)


# --- workers -> scheduler (event queue) -------------------------------------------------------


class ClientFailed(_Message):
    """A client's task failed for a reason of its own (e.g. its local data does not fit the job).

    Only for the job's event log: the round goes on without the client (deadline and quorum)."""

    type: Literal["client-failed"] = "client-failed"
    job_id: JobId
    round: Round
    client: ClientId
    reason: str = Field(max_length=4000)
    signature: str = Field("", max_length=128, description="bound clients: the client's signature of every other field")


WorkerTask = TrainTask | EvaluateTask
AggregatorCommand = UpdateReady | InitJob | CloseRound | DropJob
SchedulerEvent = (
    JobInitialized
    | UpdateMerged
    | UpdateInvalid
    | MoreWork
    | RoundCommitted
    | ClientEvaluated
    | JobFailed
    | ClientFailed
)

_worker_adapter: TypeAdapter[WorkerTask] = TypeAdapter(Annotated[WorkerTask, Field(discriminator="type")])
_aggregator_adapter: TypeAdapter[AggregatorCommand] = TypeAdapter(
    Annotated[AggregatorCommand, Field(discriminator="type")]
)
_scheduler_adapter: TypeAdapter[SchedulerEvent] = TypeAdapter(Annotated[SchedulerEvent, Field(discriminator="type")])


def encode(message: BaseModel) -> bytes:
    return msgpack.packb(message.model_dump(mode="json"), use_bin_type=True)


def _unpack(body: bytes, max_bytes: int) -> Any:
    if len(body) > max_bytes:
        raise InvalidMessage(f"message of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as error:  # msgpack raises several unrelated types for garbage input
        raise InvalidMessage(f"not a msgpack map: {error}") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"expected a msgpack map, got {type(data).__name__}")
    if data.get("v") != SCHEMA_VERSION:
        raise InvalidMessage(f"unsupported schema version {data.get('v')!r}")
    return data


def _decode(adapter: TypeAdapter[Any], body: bytes, max_bytes: int, auth: Verifier | None) -> Any:
    data = _unpack(body, max_bytes)
    if auth is not None:
        data = auth.verify(data)  # before validation: nothing of an unauthenticated message is looked at
    try:
        return adapter.validate_python(data)
    except ValidationError as error:
        raise InvalidMessage(str(error).replace("\n", " ")[:1000]) from None


def decode_task(body: bytes, max_bytes: int = 64 * 1024, auth: Verifier | None = None) -> WorkerTask:
    result: WorkerTask = _decode(_worker_adapter, body, max_bytes, auth)
    return result


def decode_aggregator(body: bytes, max_bytes: int = 64 * 1024, auth: Verifier | None = None) -> AggregatorCommand:
    result: AggregatorCommand = _decode(_aggregator_adapter, body, max_bytes, auth)
    return result


def decode_scheduler(body: bytes, max_bytes: int = 64 * 1024, auth: Verifier | None = None) -> SchedulerEvent:
    result: SchedulerEvent = _decode(_scheduler_adapter, body, max_bytes, auth)
    return result
