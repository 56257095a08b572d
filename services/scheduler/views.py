"""What the API returns about jobs: typed, so /openapi.json documents the whole contract."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from services.scaler.status import PoolStatus
from shared.spec import JobSpec
from shared.state import JobState

# A figure that is not a finite number (the loss of a model that diverged) is JSON null.
Figure = float | None


class ResponseSample(BaseModel):
    """One held-out prompt and what the client's models answered (align mode)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    prompt: str = Field(description="the held-out prompt (cut to 300 characters)")
    global_: str = Field(alias="global", description="the global model's response")
    personalized: str = Field(description="the client's personalized model's response")


class ClientFigures(BaseModel):
    """One client's held-out figures after a round: the global model vs its personalized model.

    Classification and language-model jobs report accuracy and loss. Align jobs report instead,
    for the `reference` (the base, adapters disabled), `global` and `personalized` models:
    `<model>_reward_<name>` (and its standard error `_se`) for each reward, `<model>_weighted_reward`
    (the client's preference weights over the raw rewards) with `_se`, `<model>_kl` (per-token KL
    to the reference) and `<model>_length` (tokens per response), plus `group` (its preference
    group) and `samples`. A figure that is not a finite number (a diverged model) is null.
    """

    model_config = ConfigDict(extra="allow")

    global_accuracy: Figure = Field(None, description="the global model's accuracy on the client's held-out examples")
    global_loss: Figure = Field(None, description="the global model's loss on the client's held-out examples")
    personalized_accuracy: Figure = Field(
        None, description="the client's personalized model (global part + its personal part), held-out accuracy"
    )
    personalized_loss: Figure = Field(None, description="the client's personalized model, held-out loss")
    global_weighted_reward: Figure = Field(None, description="align: the global model's weighted reward")
    personalized_weighted_reward: Figure = Field(None, description="align: the personalized model's weighted reward")
    reference_weighted_reward: Figure = Field(None, description="align: the reference model's weighted reward")
    samples: list[ResponseSample] | None = Field(None, description="align: a few held-out prompts and responses")
    examples: float = Field(description="held-out examples (align: prompts) the figures are computed on")

    @model_serializer(mode="wrap")
    def _reported_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A figure this kind of job does not report is absent; one that was reported as NaN stays null.
        reported = self.model_fields_set | set(self.model_extra or {})
        return {key: value for key, value in handler(self).items() if key in reported or key == "examples"}


class RoundView(BaseModel):
    """One committed round: its clients and every figure the aggregator and the mode reported.

    Besides the fields below a round carries the figures its training mode adds (fwd:
    perturbations, variance, waves, cosine, lr, gradient_norm) and the simulated device costs
    (delay_s, delay_s_mean, energy_j, upload_s_max, devices). A figure that is not a finite
    number (the loss of a model that diverged) is null; an optional one a round did not report
    is absent.
    """

    model_config = ConfigDict(extra="allow")

    round: int = Field(description="0 is the initial state")
    clients: list[int] = Field(description="clients whose updates were merged")
    accuracy: Figure = Field(description="global model, held-out accuracy")
    loss: Figure = Field(description="global model, held-out loss")
    train_loss: float | None = Field(None, description="mean training loss of the merged updates")
    bytes_up: float | None = Field(None, description="bytes uploaded by the round's tasks")
    bytes_down: float | None = Field(None, description="bytes of global state fetched by the round's tasks")
    duration_s: float | None = Field(None, description="wall time from opening to commit")
    per_client: dict[int, ClientFigures] | None = Field(None, description="client-side evaluations")
    client_mean_global_accuracy: float | None = Field(
        None, description="mean over per_client of global_accuracy (present with per_client)"
    )
    client_mean_personalized_accuracy: float | None = Field(
        None, description="mean over per_client of personalized_accuracy (present with per_client)"
    )
    client_mean_personalized_weighted_reward: float | None = Field(
        None, description="align: mean over per_client of personalized_weighted_reward"
    )
    dp_epsilon: Figure = Field(
        None,
        description="privacy: epsilon spent through this round at the spec's privacy.delta (null: no noise, "
        "no guarantee)",
    )
    dp_noise_std: float | None = Field(None, description="privacy: std of the noise on each averaged coordinate")
    dp_update_norm_median: float | None = Field(
        None, description="privacy, server noise: median L2 norm of the round's updates before clipping"
    )
    dp_clipped_fraction: float | None = Field(
        None, description="privacy, server noise: share of the round's updates whose norm exceeded clip_norm"
    )

    @model_serializer(mode="wrap")
    def _without_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # An optional figure a round did not report is absent, not null (round 0 has no train_loss).
        return {
            key: value for key, value in handler(self).items() if value is not None or key in _REQUIRED_ROUND_FIELDS
        }


_REQUIRED_ROUND_FIELDS = frozenset(name for name, field in RoundView.model_fields.items() if field.is_required())


class JobSummary(BaseModel):
    """A job as GET /v1/jobs lists it."""

    id: str = Field(description="the job id: the spec's name, slugged, and a random suffix")
    name: str = Field(description="the spec's name")
    tenant: str = Field("", description="the tenant that submitted it (its owner)")
    state: JobState = Field(description="queued, running, then succeeded, failed or cancelled")
    round: int = Field(description="the round in progress (0 until round 1 opens)")
    created_at: float = Field(description="Unix time")


class ClientPresence(BaseModel):
    """A bound client and whether a worker of its own is connected now."""

    client: int = Field(description="the client's index (as in per_client figures and downloads)")
    id: str = Field(description="the client's identity (clients.ids)")
    present: bool = Field(
        description="a worker consumes the client's task queue now; absent clients are stragglers that the round "
        "deadline and quorum handle"
    )


class PrivacyView(BaseModel):
    """A job's differential-privacy budget (a spec with `privacy`): (epsilon, delta)-DP at the client level."""

    delta: float = Field(description="the spec's privacy.delta")
    epsilon_spent: Figure = Field(
        description="epsilon through the latest committed round (0 before round 1; null: no noise, no guarantee)"
    )
    epsilon_total: Figure = Field(description="epsilon the job spends once all its rounds commit (null: no noise)")
    sampling_rate: float = Field(
        description="q = clients_per_round / num_clients: dp-accounting's RDP accountant takes each round as a "
        "Poisson-subsampled Gaussian mechanism at this rate"
    )


class JobView(JobSummary):
    """A job with its spec and every committed round's figures."""

    rounds: int = Field(description="rounds the job runs")
    updated_at: float = Field(description="Unix time")
    error: str | None = Field(description="why the job failed, or what it noticed on the way")
    spec: JobSpec = Field(description="the submitted spec with every default filled in")
    metrics: list[RoundView] = Field(description="committed rounds, round 0 first")
    pool: PoolStatus | None = Field(
        None, description="the job's own worker pool (a spec with `resources`): replicas, ready and lost pods"
    )
    clients: list[ClientPresence] | None = Field(
        None, description="bound clients (clients.kind bound): each one's identity and whether its worker is present"
    )
    privacy: PrivacyView | None = Field(None, description="the differential-privacy budget (a spec with `privacy`)")


class JobCreated(BaseModel):
    """The answer to a submitted job."""

    id: str = Field(description="the new job's id")


class ErrorBody(BaseModel):
    """An error the API answers with (400, 401, 404, 409, 413)."""

    detail: str = Field(description="what is wrong, in a sentence")


class FieldError(BaseModel):
    """One reason a request did not validate."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="the error's kind, e.g. missing, int_type, extra_forbidden, json_invalid")
    loc: list[str | int] = Field(
        description="where: 'body' and the path to the field (empty past 'body' for rules between fields)"
    )
    msg: str = Field(description="what is wrong, in a sentence")
    input: Any = Field(None, description="the offending value")
    ctx: dict[str, Any] | None = Field(None, description="the constraint the value broke, e.g. {'ge': 1}")


class ValidationErrors(BaseModel):
    """A request that does not validate (422): not JSON, or a spec that breaks its schema or a rule between fields."""

    detail: list[FieldError] = Field(description="every error found")


class Health(BaseModel):
    """The process answers (liveness)."""

    status: Literal["ok"] = Field(description="always ok")


class Purged(BaseModel):
    """What `DELETE /v1/jobs/{id}?purge=true` removed."""

    id: str = Field(description="the job's id")
    purged: Literal[True] = Field(description="always true: nothing of the job is left in the store")
    cancelled: bool = Field(description="the job was queued or running, and was cancelled first")
    previous_state: JobState | None = Field(
        description="its state before the purge (null: its record had already expired, leftovers were removed)"
    )
    keys_removed: int = Field(
        description="store keys removed: its record, round plans and records, updates, global states, published "
        "models (global, clients', adaptations), clients' personal parts and residuals, evaluations"
    )


class Readiness(BaseModel):
    """Whether the scheduler can serve: its event loop consumes, the broker and the store answer."""

    ready: bool = Field(description="consumer, broker, store and state are all true")
    consumer: bool = Field(description="the scheduler's event loop is running")
    broker: bool = Field(description="the event loop holds a broker connection that moved data in the last 15 s")
    store: bool = Field(description="the store answered a PING (on its pooled connection) in the last 15 s")
    state: bool = Field(
        description="the store still holds the state the scheduler saw: its instance marker is there (false between "
        "finding it lost, e.g. Redis restarted without persistence, and recording the jobs it lost as failed)"
    )
