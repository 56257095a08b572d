"""The HTTP API (FastAPI; OpenAPI at /docs). Every /v1 route needs `Authorization: Bearer <token>`."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidatorFunctionWrapHandler, WrapValidator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.scheduler.core import JobConflict, Scheduler
from services.scheduler.views import (
    ErrorBody,
    Health,
    JobCreated,
    JobSummary,
    JobView,
    Readiness,
    ValidationErrors,
)
from shared.metrics import HTTP_REQUESTS
from shared.spec import JobSpec
from shared.state import JobNotFound

# Module level: FastAPI resolves dependency annotations against module globals.
_bearer = HTTPBearer(auto_error=False)

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
    422: {
        "model": ValidationErrors,
        "description": "not JSON, or a spec that does not validate (its schema, or a rule between fields): "
        "`detail` lists each error",
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

MAX_BODY_BYTES = 1024 * 1024
"""A job spec is a few kB; anything much larger is refused before it is parsed."""


def create_app(scheduler: Scheduler, api_token: str, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    if not api_token:
        raise ValueError("the API needs a token: set PWFF_API_TOKEN")
    app = FastAPI(
        title="pwff",
        version="0.1.0",
        description="Personalized federated fine-tuning of language models: submit jobs, follow rounds, "
        "download adapters.",
    )
    app.middleware("http")(_count_requests)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.include_router(_jobs_router(scheduler, api_token))
    _add_probes(app, scheduler)
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


def _jobs_router(scheduler: Scheduler, api_token: str) -> APIRouter:
    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_token.encode()):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"}
            )

    router = APIRouter(prefix="/v1/jobs", dependencies=[Depends(authorized)], responses=_UNAUTHORIZED, tags=["jobs"])

    def job_or_404(job_id: str) -> dict[str, Any]:
        try:
            return scheduler.get_job(job_id)
        except JobNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}") from None

    @router.post("", status_code=status.HTTP_201_CREATED, responses=_INVALID_SPEC)
    def submit_job(spec: SubmittedSpec) -> JobCreated:
        """Submit a job; it starts as soon as the aggregator has its initial state.

        The body is a JobSpec; every field has a default, so `{}` is a valid job.
        """
        return JobCreated(id=scheduler.submit(spec))

    @router.get("")
    def list_jobs() -> list[JobSummary]:
        """Every job, newest first."""
        return [JobSummary.model_validate(job) for job in scheduler.list_jobs()]

    @router.get("/{job_id}", response_model=JobView, responses=_NOT_FOUND)
    def get_job(job_id: JobId) -> dict[str, Any]:
        """A job: its state, spec and every committed round's figures."""
        return job_or_404(job_id)

    @router.delete(
        "/{job_id}",
        response_model=JobView,
        responses={**_NOT_FOUND, 409: {"model": ErrorBody, "description": "the job already ended"}},
    )
    def cancel_job(job_id: JobId) -> dict[str, Any]:
        """Cancel a queued or running job (409 if it already ended).

        The job is not removed: it stays listed and readable, in state `cancelled`.
        """
        job_or_404(job_id)
        try:
            scheduler.cancel(job_id)
        except JobConflict as error:
            raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
        return job_or_404(job_id)

    def archive_response(job_id: str, client: int | None) -> Response:
        job_or_404(job_id)
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
    def global_model(job_id: JobId) -> Response:
        """The published global adapter (updated after every round)."""
        return archive_response(job_id, None)

    @router.get(
        "/{job_id}/models/clients/{client}",
        response_class=Response,
        responses={
            **_ARCHIVE,
            **_NOT_FOUND,
            422: {"model": ValidationErrors, "description": "client is not an integer"},
        },
    )
    def client_model(job_id: JobId, client: ClientId) -> Response:
        """One client's personalized adapter (published when the job ends)."""
        return archive_response(job_id, client)

    return router


def _add_probes(app: FastAPI, scheduler: Scheduler) -> None:
    @app.get("/healthz", tags=["probes"])
    def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        tags=["probes"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "the broker or the store does not answer"}},
    )
    def readyz() -> JSONResponse:
        """Readiness: the broker and the store both answer."""
        checks = {"broker": scheduler.bus.ping(), "store": scheduler.store.ping()}
        ready = all(checks.values())
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
