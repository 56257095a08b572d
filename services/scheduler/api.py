"""The HTTP API (FastAPI; OpenAPI at /docs). Every /v1 route needs `Authorization: Bearer <token>`."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from services.scheduler.core import JobConflict, Scheduler
from shared.jobs import JobNotFound
from shared.metrics import HTTP_REQUESTS
from shared.spec import JobSpec

# Module level: FastAPI resolves dependency annotations against module globals.
_bearer = HTTPBearer(auto_error=False)


class JobCreated(BaseModel):
    id: str


def create_app(scheduler: Scheduler, api_token: str) -> FastAPI:
    if not api_token:
        raise ValueError("the API needs a token: set PWFF_API_TOKEN")
    app = FastAPI(
        title="pwff",
        version="0.1.0",
        description="Personalized federated fine-tuning of language models: submit jobs, follow rounds, "
        "download adapters.",
    )

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_token.encode()):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"}
            )

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        HTTP_REQUESTS.labels(method=request.method, route=template, status=str(response.status_code)).inc()
        return response

    def job_or_404(job_id: str) -> dict[str, Any]:
        try:
            return scheduler.get_job(job_id)
        except JobNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}") from None

    auth = [Depends(authorized)]

    @app.post("/v1/jobs", status_code=status.HTTP_201_CREATED, dependencies=auth)
    def submit_job(spec: JobSpec) -> JobCreated:
        return JobCreated(id=scheduler.submit(spec))

    @app.get("/v1/jobs", dependencies=auth)
    def list_jobs() -> list[dict[str, Any]]:
        return scheduler.list_jobs()

    @app.get("/v1/jobs/{job_id}", dependencies=auth)
    def get_job(job_id: str) -> dict[str, Any]:
        return job_or_404(job_id)

    @app.delete("/v1/jobs/{job_id}", dependencies=auth)
    def cancel_job(job_id: str) -> dict[str, Any]:
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

    @app.get("/v1/jobs/{job_id}/models/global", dependencies=auth, response_class=Response)
    def global_model(job_id: str) -> Response:
        return archive_response(job_id, None)

    @app.get("/v1/jobs/{job_id}/models/clients/{client}", dependencies=auth, response_class=Response)
    def client_model(job_id: str, client: int) -> Response:
        return archive_response(job_id, client)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = {"broker": scheduler.bus.ping(), "store": scheduler.store.ping()}
        ready = all(checks.values())
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
