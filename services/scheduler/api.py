"""The HTTP API (FastAPI; OpenAPI at /docs). Every /v1 route needs `Authorization: Bearer <token>`.

The token names a tenant (services.scheduler.tenants): a member sees and acts on its own jobs only
(another tenant's job is a 404, as if it did not exist), an admin on every job.
"""

from __future__ import annotations

import math
import secrets
import threading
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidatorFunctionWrapHandler, WrapValidator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.scheduler.core import JobConflict, Scheduler
from services.scheduler.tenants import SubmitRateLimiter, Tenant, Tenants
from services.scheduler.views import (
    ErrorBody,
    Health,
    JobCreated,
    JobSummary,
    JobView,
    Purged,
    Readiness,
    ValidationErrors,
)
from shared.data import check_local_data
from shared.health import STALE_AFTER_S
from shared.health import Readiness as ProbeChecks
from shared.metrics import HTTP_REQUESTS
from shared.spec import JobSpec
from shared.state import JobEvent, JobNotFound

# Module level: FastAPI resolves dependency annotations against module globals.
_bearer = HTTPBearer(auto_error=False)


def _caller(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Tenant:
    """The tenant whose bearer token the request carries (the app's `tenants`), else 401."""
    tenants: Tenants = request.app.state.tenants
    tenant = tenants.authenticate(credentials.credentials) if credentials is not None else None
    if tenant is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"}
        )
    return tenant


# On the router too, so a route added later cannot forget it; FastAPI runs it once per request.
Caller = Annotated[Tenant, Depends(_caller)]

_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorBody,
        "description": "missing or invalid token",
        "headers": {"WWW-Authenticate": {"description": "always `Bearer`", "schema": {"type": "string"}}},
    }
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "no such job (or model)"}}
_ARCHIVE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        "description": "a PEFT folder as a tar.gz",
        "headers": {
            "Content-Disposition": {
                "description": 'attachment; filename="<job id>-global.tar.gz" (or -client-<n>)',
                "schema": {"type": "string"},
            }
        },
    },
}
_INVALID_SPEC: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body cannot be read (e.g. it is not UTF-8)"},
    413: {"model": ErrorBody, "description": "the body is larger than the API accepts"},
    429: {
        "model": ErrorBody,
        "description": "the tenant submitted more jobs than its rate limit allows",
        "headers": {"Retry-After": {"description": "seconds until it may submit again", "schema": {"type": "integer"}}},
    },
    422: {
        "model": ValidationErrors,
        "description": "not JSON, or a spec that does not validate (its schema, or a rule between fields): "
        "`detail` lists each error",
    },
}

_ADAPT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body cannot be read (e.g. it is not UTF-8)"},
    404: {"model": ErrorBody, "description": "no such job"},
    409: {
        "model": ErrorBody,
        "description": "the job has not committed a global state yet, or (start clients-mean, clients-basis) has "
        "not published its clients' models yet (it does when it ends)",
    },
    413: {"model": ErrorBody, "description": "the body is larger than the API accepts"},
    422: {
        "model": ValidationErrors,
        "description": "not JSON, a body that breaks its schema, or one the job cannot use: a label that is not one "
        "of its data set's classes, train personal or a start from the clients for a job that keeps nothing personal",
    },
}

JobId = Annotated[str, Path(description="a job id as returned by POST /v1/jobs")]
# Documented as >= 0 (the valid clients); a negative one is answered like any other out-of-range client, 404.
ClientId = Annotated[
    int, Path(description="a client of the job, 0-based (404 when out of range)", json_schema_extra={"minimum": 0})
]


def _exactly_as_json(value: Any, handler: ValidatorFunctionWrapHandler) -> JobSpec:
    """A submitted spec validates as its JSON Schema reads: no lax coercion of `false` to 0,
    `"3"` to 3 or 1 to true (pydantic's strict mode), but an integral number such as 3.0 is an
    integer, as JSON Schema has it. Specs read from YAML files (where `1e-3` is a string) keep
    the lax mode; the CLI submits them as `model_dump(mode="json")`."""
    if isinstance(value, JobSpec):
        return value
    return JobSpec.model_validate(_integral_as_int(value), strict=True)


def _integral_as_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_as_int(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_as_int(item) for item in value]
    return value


SubmittedSpec = Annotated[JobSpec, WrapValidator(_exactly_as_json), Body()]


class LabeledText(BaseModel):
    """One of a newcomer's examples."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=20_000, description="the example's text")
    label: int | str = Field(
        0, description="a class index or class name of the job's data set (ignored for causal-LM jobs)"
    )


class AdaptRequest(BaseModel):
    """A client that never trained: its examples, and how to fine-tune its personal part on them."""

    model_config = ConfigDict(extra="forbid")

    examples: list[LabeledText] = Field(min_length=1, max_length=4096, description="the newcomer's training examples")
    eval_examples: list[LabeledText] = Field(
        default_factory=list,
        max_length=4096,
        description="held-out examples: the answer then has the model's figures before and after the steps",
    )
    steps: int = Field(20, ge=0, le=1000, description="local optimizer steps (the job's optimizer and batch size)")
    lr: float | None = Field(None, gt=0, le=10, description="learning rate (default: the job's optimizer.lr)")
    train: Literal["personal", "all"] | None = Field(
        None,
        description="fine-tune the job's personal part only, or every trainable tensor (default: personal when the "
        "job keeps something personal, else all)",
    )
    start: Literal["global", "clients-mean", "clients-basis"] | None = Field(
        None,
        description="start the personal part at its initial values (global: the published global model), from the "
        "merged personal parts of the job's published client models (clients-mean), or from their merged LoRA A with "
        "B zero (clients-basis: the model starts as the global one, its steps move where the clients' LoRAs did); "
        "default: clients-basis when the job keeps whole LoRAs personal (pwff) and has published its clients' "
        "models, else global",
    )
    seed: int = Field(0, ge=0, lt=2**31, description="seeds the minibatch order and dropout")


class GenerateRequest(BaseModel):
    """A prompt for a causal-LM job's global model, or one client's personalized model."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=8000, description="the user turn (the model's chat template wraps it)")
    client: int | None = Field(
        None, ge=0, description="answer with this client's model (global part + its personal part); default: global"
    )
    max_new_tokens: int = Field(64, ge=1, le=512, description="longest answer, in tokens")
    temperature: float = Field(0.0, ge=0, le=5, description="0: greedy; above: sampled at this temperature")
    seed: int = Field(0, ge=0, lt=2**31, description="seeds the sampling")


class GenerateView(BaseModel):
    text: str = Field(description="the model's answer")
    tokens: int = Field(description="tokens generated")
    round: int = Field(description="the committed round whose state answered")
    model: str = Field(description='"global" or "client-<n>"')


def _generate_request_as_json(value: Any, handler: ValidatorFunctionWrapHandler) -> GenerateRequest:
    if isinstance(value, GenerateRequest):
        return value
    return GenerateRequest.model_validate(_integral_as_int(value), strict=True)


SubmittedPrompt = Annotated[GenerateRequest, WrapValidator(_generate_request_as_json), Body()]

_GENERATE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body cannot be read (e.g. it is not UTF-8)"},
    404: {"model": ErrorBody, "description": "no such job"},
    409: {
        "model": ErrorBody,
        "description": "the job has not committed a state yet, or the client has not trained yet",
    },
    413: {"model": ErrorBody, "description": "the body is larger than the API accepts"},
    422: {
        "model": ValidationErrors,
        "description": "not JSON, a body that breaks its schema, a client out of range, or a job whose model is a "
        "sequence classifier",
    },
}


class EvalFigures(BaseModel):
    accuracy: float | None = Field(description="accuracy on eval_examples (null if not a finite number)")
    loss: float | None = Field(description="mean loss on eval_examples (null if not a finite number)")


class AdaptationView(BaseModel):
    """A newcomer's adapted model: what it started from, what it trained, and where to download it."""

    id: str = Field(description="the adaptation's id")
    job_id: str = Field(description="the job it started from")
    round: int = Field(description="the job's committed round whose global state it started from")
    start: Literal["global", "clients-mean", "clients-basis"] = Field(description="where its personal part started")
    train: Literal["personal", "all"] = Field(description="what it fine-tuned")
    steps: int = Field(description="local steps taken")
    trained_tensors: int = Field(description="tensors fine-tuned")
    trained_params: int = Field(description="parameters fine-tuned")
    train_loss: float | None = Field(description="mean training loss over the steps (null for 0 steps)")
    before: EvalFigures | None = Field(description="figures on eval_examples before any step (null without them)")
    after: EvalFigures | None = Field(description="figures on eval_examples after the last step (null without them)")
    model: str = Field(description="GET this path for the adapted model (a PEFT folder as a tar.gz)")


def _adapt_request_as_json(value: Any, handler: ValidatorFunctionWrapHandler) -> AdaptRequest:
    """As a submitted spec: strict, but an integral number such as 20.0 is an integer (JSON Schema's view)."""
    if isinstance(value, AdaptRequest):
        return value
    return AdaptRequest.model_validate(_integral_as_int(value), strict=True)


SubmittedAdaptation = Annotated[AdaptRequest, WrapValidator(_adapt_request_as_json), Body()]

AdaptationId = Annotated[
    str, Path(description="an adaptation id as returned by POST /v1/jobs/{job_id}/adapt", pattern="^[0-9a-f]{12}$")
]

DOCS_ASSETS = "/docs-assets"
"""Where the API serves Swagger UI's and ReDoc's own files."""

MAX_BODY_BYTES = 1024 * 1024
"""A job spec is a few kB; anything much larger is refused before it is parsed."""


def create_app(
    scheduler: Scheduler,
    tenants: Tenants | str,
    max_body_bytes: int = MAX_BODY_BYTES,
    cache_dir: FilePath | None = None,
    probe_stale_s: float = STALE_AFTER_S,
    submit_limit: SubmitRateLimiter | None = None,
) -> FastAPI:
    """The API; `tenants` may be a single token (PWFF_API_TOKEN alone: one admin tenant).

    `submit_limit`: each tenant's submission rate (the scheduler process always sets one from
    PWFF_SUBMIT_RATE_PER_MINUTE and PWFF_SUBMIT_BURST; None, in tests, submits without a limit).
    """
    if isinstance(tenants, str):
        tenants = Tenants.single(tenants)
    # /docs (Swagger UI) and /redoc load their JS and CSS from DOCS_ASSETS, served from the fastapi-offline
    # package, not from a CDN: they work on an air-gapped cluster. No validator badge either (it calls out).
    app = FastAPIOffline(
        title="pwff",
        version="0.1.0",
        description="Personalized federated fine-tuning of language models: submit jobs, follow rounds, "
        "download adapters.",
        static_url=DOCS_ASSETS,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.middleware("http")(_count_requests)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.tenants = tenants
    app.include_router(_jobs_router(scheduler, submit_limit, cache_dir))
    _add_probes(app, scheduler, probe_stale_s)
    return app


class BodyLimit:
    """Answers 413 to a request body over `max_bytes`, declared or streamed, before anything parses it.

    The body is read here, up to the limit, and replayed to the app: refusing from inside the
    app's own read would not do, since FastAPI answers 400 to any error raised while it reads
    a body (a chunked upload over the limit was a 400).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away; the app hears so
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        buffered = iter(messages)

        async def replay() -> Message:
            message = next(buffered, None)
            return message if message is not None else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body larger than {self.max_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=status.HTTP_413_CONTENT_TOO_LARGE)(scope, receive, send)


async def _http_error(request: Request, error: Exception) -> Response:
    """FastAPI's answer to an HTTPException, with a 405's `Allow` listing every method of the path.

    Starlette answers 405 from the first route whose path matches, so a path served by several
    routes (GET and POST /v1/jobs) would advertise only that route's method.
    """
    assert isinstance(error, StarletteHTTPException)
    if error.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        routes = request.app.router.routes
        allowed = [
            method
            for method in _METHODS
            if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
        ]
        if allowed:
            error.headers = {**(error.headers or {}), "Allow": ", ".join(allowed)}
    return await http_exception_handler(request, error)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def _count_requests(request: Request, call_next: Any) -> Response:
    response: Response = await call_next(request)
    template = getattr(request.scope.get("route"), "path", "unmatched")
    HTTP_REQUESTS.labels(method=request.method, route=template, status=str(response.status_code)).inc()
    return response


def _jobs_router(scheduler: Scheduler, submit_limit: SubmitRateLimiter | None, cache_dir: FilePath | None) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", dependencies=[Depends(_caller)], responses=_UNAUTHORIZED, tags=["jobs"])

    def owned(job_id: str, caller: Tenant) -> None:
        """404, not 403, for another tenant's job: a member cannot even learn that it exists."""
        meta = scheduler.jobs.get(job_id)
        if meta is None or not (caller.admin or meta.tenant == caller.name):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")

    def job_or_404(job_id: str, caller: Tenant) -> dict[str, Any]:
        owned(job_id, caller)
        try:
            return scheduler.get_job(job_id)
        except JobNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}") from None

    @router.post("", status_code=status.HTTP_201_CREATED, responses=_INVALID_SPEC)
    def submit_job(spec: SubmittedSpec, caller: Caller) -> JobCreated:
        """Submit a job, owned by the caller's tenant; it starts as soon as the aggregator has its initial state.

        The body is a JobSpec; every field has a default, so `{}` is a valid job. Each tenant may submit
        PWFF_SUBMIT_BURST jobs at once and PWFF_SUBMIT_RATE_PER_MINUTE a minute (429 beyond).
        """
        # Before the spec's data is read: the limit also bounds the work a tenant can make the API do.
        wait_s = submit_limit.take(caller.name) if submit_limit is not None else 0.0
        if wait_s > 0:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"tenant {caller.name} is over its submission rate limit; retry in {math.ceil(wait_s)}s",
                {"Retry-After": str(math.ceil(wait_s))},
            )
        try:
            # A local data source is read here: its fields and labels are checked and its label set pinned.
            spec = check_local_data(spec)
        except ValueError as error:
            raise _unprocessable("dataset", str(error)) from None
        return JobCreated(id=scheduler.submit(spec, tenant=caller.name))

    @router.get("")
    def list_jobs(caller: Caller) -> list[JobSummary]:
        """The caller's tenant's jobs (an admin: every job), newest first."""
        jobs = scheduler.list_jobs(tenant=None if caller.admin else caller.name)
        return [JobSummary.model_validate(job) for job in jobs]

    @router.get("/{job_id}", response_model=JobView, responses=_NOT_FOUND)
    def get_job(job_id: JobId, caller: Caller) -> dict[str, Any]:
        """A job: its state, spec and every committed round's figures."""
        return job_or_404(job_id, caller)

    @router.get("/{job_id}/events", responses=_NOT_FOUND)
    def job_events(job_id: JobId, caller: Caller) -> list[JobEvent]:
        """What happened to a job, oldest first: state changes, round commits, rounds closed at their
        deadline without some clients, and client failures with their reasons (the latest 1000)."""
        owned(job_id, caller)
        try:
            return scheduler.events(job_id)
        except JobNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}") from None

    @router.delete(
        "/{job_id}",
        response_model=JobView | Purged,
        responses={
            200: {"description": "without purge: the cancelled job (a JobView); with purge=true: what went (Purged)"},
            **_NOT_FOUND,
            409: {"model": ErrorBody, "description": "the job already ended (without purge)"},
        },
    )
    def cancel_job(
        job_id: JobId,
        caller: Caller,
        purge: Annotated[
            bool,
            Query(
                description="remove the job: every key it has in the store (state, rounds, published models, "
                "clients' personal parts, results), after cancelling it if it has not ended; any state is fine"
            ),
        ] = False,
    ) -> dict[str, Any]:
        """Cancel a queued or running job (409 if it already ended), or with `purge=true` remove it.

        Without purge the job is not removed: it stays listed and readable, in state `cancelled`, until its
        retention (PWFF_JOB_RETENTION_S after it ended) expires its keys.
        """
        if purge:
            # An admin may purge what is left of a job whose record already expired; a member only its own jobs.
            if not caller.admin:
                owned(job_id, caller)
            try:
                return scheduler.purge(job_id)
            except JobNotFound:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}") from None
        job_or_404(job_id, caller)
        try:
            scheduler.cancel(job_id)
        except JobConflict as error:
            raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
        return job_or_404(job_id, caller)

    def archive_response(job_id: str, client: int | None, caller: Tenant) -> Response:
        job_or_404(job_id, caller)
        try:
            blob = scheduler.model_archive(job_id, client)
        except ValueError as error:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
        if blob is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has not published a model yet")
        name = "global" if client is None else f"client-{client}"
        return Response(
            blob,
            media_type="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="{job_id}-{name}.tar.gz"'},
        )

    @router.get("/{job_id}/models/global", response_class=Response, responses={**_ARCHIVE, **_NOT_FOUND})
    def global_model(job_id: JobId, caller: Caller) -> Response:
        """The published global adapter (updated after every round)."""
        return archive_response(job_id, None, caller)

    @router.get(
        "/{job_id}/models/clients/{client}",
        response_class=Response,
        responses={
            **_ARCHIVE,
            **_NOT_FOUND,
            422: {"model": ValidationErrors, "description": "client is not an integer"},
        },
    )
    def client_model(job_id: JobId, client: ClientId, caller: Caller) -> Response:
        """One client's personalized adapter (published when the job ends)."""
        return archive_response(job_id, client, caller)

    adaptations = _Adaptations(scheduler, cache_dir)

    @router.post("/{job_id}/generate", responses=_GENERATE_ERRORS)
    def generate(job_id: JobId, request: SubmittedPrompt, caller: Caller) -> GenerateView:
        """An answer from the job's latest global model, or from one client's personalized model.

        Runs in this process (torch and the model are loaded on the first request), one at a time.
        """
        job_or_404(job_id, caller)
        return adaptations.generate(job_id, request)

    @router.post("/{job_id}/adapt", status_code=status.HTTP_201_CREATED, responses=_ADAPT_ERRORS)
    def adapt_job(job_id: JobId, request: SubmittedAdaptation, caller: Caller) -> AdaptationView:
        """Cold start: a model for a client that never trained, from the job's global part plus local steps.

        The newcomer's personal part (the tensors the job's preset keeps with each client) starts at
        its initial values or from the job's clients' published personal parts, merged, and is
        fine-tuned on `examples` for `steps` steps; everything global stays as the job trained it.
        Runs in this process, one adaptation at a time. The examples travel to the server: a client
        that keeps its data to itself runs `pwff adapt` instead, which does the same on its own machine.
        """
        job_or_404(job_id, caller)
        return adaptations.run(job_id, request)

    @router.get(
        "/{job_id}/adaptations/{adaptation_id}/model",
        response_class=Response,
        responses={
            **_ARCHIVE,
            404: {"model": ErrorBody, "description": "no such job or adaptation"},
            422: {"model": ValidationErrors, "description": "adaptation_id is not 12 hex digits"},
        },
    )
    def adapted_model(job_id: JobId, adaptation_id: AdaptationId, caller: Caller) -> Response:
        """A newcomer's adapted model (POST /v1/jobs/{job_id}/adapt made it)."""
        job_or_404(job_id, caller)
        blob = scheduler.state.tensors.archive(job_id, f"adapted-{adaptation_id}")
        if blob is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no adaptation {adaptation_id}")
        return Response(
            blob,
            media_type="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="{job_id}-adapted-{adaptation_id}.tar.gz"'},
        )

    return router


class _Adaptations:
    """Runs newcomers' adaptations in the API process (torch is imported on the first one), one at a time."""

    def __init__(self, scheduler: Scheduler, cache_dir: FilePath | None) -> None:
        self.scheduler = scheduler
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._models: Any = None

    def _model_cache(self) -> Any:
        from shared.adapters import ModelCache
        from shared.settings import Settings

        if self._models is None:
            self._models = ModelCache(self.cache_dir or Settings().cache_dir)
        return self._models

    def generate(self, job_id: str, request: GenerateRequest) -> GenerateView:
        from shared import generation

        spec = self.scheduler.jobs.spec(job_id)
        try:
            generation.check_causal(spec)
        except generation.GenerationError as error:
            raise _unprocessable("", str(error)) from None
        with self._lock:
            model, tokenizer = self._model_cache().get(spec)
            try:
                answer = generation.answer_from_store(
                    self.scheduler.state,
                    model,
                    tokenizer,
                    job_id,
                    spec,
                    request.prompt,
                    request.client,
                    max_new_tokens=request.max_new_tokens,
                    temperature=request.temperature,
                    seed=request.seed,
                )
            except generation.NotReady as error:
                raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
            except generation.GenerationError as error:
                raise _unprocessable(error.field, str(error)) from None
        return GenerateView(text=answer.text, tokens=answer.tokens, round=answer.round, model=answer.model)

    def run(self, job_id: str, request: AdaptRequest) -> AdaptationView:
        from shared import coldstart

        spec = self.scheduler.jobs.spec(job_id)

        def examples(field: str, items: list[LabeledText]) -> list[Any]:
            try:
                return [
                    coldstart.example_from(item.text, item.label, spec, f"{field}[{i}]") for i, item in enumerate(items)
                ]
            except coldstart.ColdStartError as error:
                raise _unprocessable(field, str(error)) from None

        train_examples = examples("examples", request.examples)
        eval_examples = examples("eval_examples", request.eval_examples)
        with self._lock:
            try:
                served = coldstart.serve(
                    self.scheduler.state,
                    self._model_cache(),
                    job_id,
                    spec,
                    train_examples,
                    request.steps,
                    start=coldstart.Start(request.start) if request.start else None,
                    train=coldstart.Train(request.train) if request.train else None,
                    lr=request.lr,
                    seed=request.seed,
                    eval_examples=eval_examples,
                )
            except coldstart.NotReady as error:
                raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
            except coldstart.ColdStartError as error:
                raise _unprocessable(error.field, str(error)) from None
        adaptation_id = secrets.token_hex(6)
        self.scheduler.state.tensors.put_archive(job_id, f"adapted-{adaptation_id}", served.archive)
        adaptation = served.adaptation

        def figures(point: Any) -> EvalFigures | None:
            return None if point is None else EvalFigures(accuracy=_finite(point.accuracy), loss=_finite(point.loss))

        return AdaptationView(
            id=adaptation_id,
            job_id=job_id,
            round=served.round,
            start=served.start.value,
            train=served.train.value,
            steps=adaptation.steps,
            trained_tensors=len(adaptation.trained),
            trained_params=adaptation.trained_params,
            train_loss=_finite(adaptation.train_loss),
            before=figures(served.before),
            after=figures(served.after),
            model=f"/v1/jobs/{job_id}/adaptations/{adaptation_id}/model",
        )


def _finite(value: float | None) -> float | None:
    return value if value is not None and value == value and abs(value) != float("inf") else None


def _unprocessable(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own (ValidationErrors), for a body the job cannot use."""
    where = ["body", field] if field else ["body"]
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, [{"type": "value_error", "loc": where, "msg": message}])


def _add_probes(app: FastAPI, scheduler: Scheduler, stale_after_s: float) -> None:
    @app.get("/healthz", tags=["probes"])
    def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    # From the connections the scheduler already holds (its event consumer's, the store's pool): a probe
    # opens none, and a hanging store cannot hang it (shared.health).
    readiness = ProbeChecks(scheduler.bus, scheduler.queues.events, scheduler.store, stale_after_s=stale_after_s)

    @app.get(
        "/readyz",
        tags=["probes"],
        response_model=Readiness,
        responses={
            503: {
                "model": Readiness,
                "description": "the event loop is not consuming, the broker or store is gone, or the store lost its "
                "state and the jobs it held are not yet recorded as failed",
            }
        },
    )
    def readyz() -> JSONResponse:
        """Readiness: the event loop consumes, over a live broker connection, and the store answers with the
        state the scheduler saw (its instance marker, checked every tick)."""
        checks = {**readiness.checks(), "state": scheduler.store_state_known}
        ready = all(checks.values())
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
