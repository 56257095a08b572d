"""The Python client of pwff's HTTP API: what `pwff submit/status/wait/download/cancel/jobs` use.

    from services.client import Client

    with Client("http://pwff:8080", token) as pwff:
        job_id = pwff.submit(spec)               # a JobSpec, or a mapping the API validates
        job = pwff.wait(job_id, on_progress=lambda view: print(view.state, view.round))
        for event in pwff.events(job_id):
            print(event.kind, event.message)
        pwff.download(job_id, Path("results"))

Answers are the API's own response models (`services.scheduler.views`), so a client and the
server validate the same contract. Connection errors and 5xx answers are retried with
exponential backoff (a POST only when the request never left: a retried submit must not start
a job twice); a 4xx raises an `ApiError` subclass carrying the API's own message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from services.scheduler.views import JobCreated, JobSummary, JobView, Purged
from shared.spec import JobSpec, plain_message
from shared.state import JobEvent, JobState

__all__ = ["ApiError", "Client", "Conflict", "InvalidRequest", "NotFound", "PwffError", "Unauthorized", "Unreachable"]


class PwffError(RuntimeError):
    """Anything the client could not do."""


class Unreachable(PwffError):
    """The API did not answer (connection refused, timeout), or kept answering 5xx, after the retries."""


class ApiError(PwffError):
    """The API refused the request; `message` is its own explanation."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message


class Unauthorized(ApiError):
    """401: no token, or a wrong one."""


class NotFound(ApiError):
    """404: no such job (or model, or client)."""


class Conflict(ApiError):
    """409: the request does not fit the job's state (e.g. cancelling a finished job)."""


class InvalidRequest(ApiError):
    """400, 413 or 422: a spec or body the API cannot use; `message` names the field."""


_ERRORS: dict[int, type[ApiError]] = {401: Unauthorized, 404: NotFound, 409: Conflict}


class _ServerError(Exception):
    """A 5xx answer: retried, then reported as Unreachable."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.status_code}: {_message(response)}")


def _message(response: httpx.Response) -> str:
    """The API's explanation: `detail` as a sentence, or each validation error as `field: message`."""
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason_phrase
    detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
    if isinstance(detail, list):
        # FastAPI's validation errors: drop the leading "body" of each location.
        parts = []
        for item in detail:
            where = ".".join(str(p) for p in item.get("loc", [])[1:])
            message = plain_message(str(item.get("msg")))
            parts.append(f"{where}: {message}" if where else message)
        return "; ".join(parts)
    return str(detail)


class Client:
    """A pwff deployment's API. `http` replaces the HTTP client (tests pass FastAPI's TestClient)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        token: str = "",
        *,
        timeout_s: float = 60.0,
        attempts: int = 5,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if http is None:
            http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s)
        http.headers.update(headers)
        self.http = http
        self.attempts = attempts

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- the API ----------------------------------------------------------------------------

    def submit(self, spec: JobSpec | Mapping[str, Any]) -> str:
        """Submit a job; returns its id. A mapping is sent as is, for the API to validate."""
        body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else dict(spec)
        return JobCreated.model_validate(self._request("POST", "/v1/jobs", json=body).json()).id

    def status(self, job_id: str) -> JobView:
        """The job: its state, spec and every committed round's figures."""
        return JobView.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self) -> list[JobSummary]:
        """Every job, newest first."""
        return [JobSummary.model_validate(job) for job in self._request("GET", "/v1/jobs").json()]

    def events(self, job_id: str) -> list[JobEvent]:
        """What happened to the job, oldest first: state changes, round commits, client failures."""
        return [JobEvent.model_validate(event) for event in self._request("GET", f"/v1/jobs/{job_id}/events").json()]

    def cancel(self, job_id: str) -> JobView:
        """Cancel a queued or running job (Conflict if it already ended)."""
        return JobView.model_validate(self._request("DELETE", f"/v1/jobs/{job_id}").json())

    def purge(self, job_id: str) -> Purged:
        """Remove everything the job left in the store (cancelling it first if it runs)."""
        return Purged.model_validate(self._request("DELETE", f"/v1/jobs/{job_id}", params={"purge": "true"}).json())

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[JobView], None] | None = None,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> JobView:
        """Poll until the job ends; `on_progress` sees the view whenever its state, round or figures change.

        Returns the final view whatever the outcome (check `.state`); TimeoutError after `timeout_s`.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last: tuple[str, int, int] | None = None
        while True:
            view = self.status(job_id)
            marker = (str(view.state), view.round, len(view.metrics))
            if marker != last and on_progress is not None:
                on_progress(view)
            last = marker
            if JobState(view.state).final:
                return view
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {view.state} after {timeout_s}s")
            time.sleep(poll_s)

    def global_model(self, job_id: str) -> bytes:
        """The global adapter as a tar.gz (a PEFT folder)."""
        return self._request("GET", f"/v1/jobs/{job_id}/models/global").content

    def client_model(self, job_id: str, client: int) -> bytes | None:
        """One client's personalized adapter (tar.gz), or None if it published none."""
        try:
            return self._request("GET", f"/v1/jobs/{job_id}/models/clients/{client}").content
        except NotFound:
            return None

    def download(self, job_id: str, out: Path, client: int | None = None) -> Path:
        """Write the job's results to `out` as `pwff run` does (global and clients' PEFT folders,
        metrics.json, metrics.png), or with `client` only that client's PEFT folder."""
        # Imported here: unpacking needs the model helpers (torch), which submit/wait/events do not.
        from services.results import write_results
        from shared.models import extract_archive

        if client is not None:
            blob = self.client_model(job_id, client)
            if blob is None:
                raise NotFound(404, f"client {client} of job {job_id} published no model")
            return extract_archive(blob, out)
        view = self.status(job_id)
        try:
            global_blob: bytes | None = self.global_model(job_id)
        except NotFound:
            global_blob = None
        write_results(
            out,
            view.model_dump(mode="json", by_alias=True),
            global_blob,
            lambda c: self.client_model(job_id, c),
            range(view.spec.num_clients),
        )
        return out

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Any other call (e.g. /generate): retried and checked like the rest."""
        return self._request(method, path, **kwargs)

    # -- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # A POST is retried only when it never reached the server: a repeated submit would start a second job.
        idempotent = method in ("GET", "HEAD", "PUT", "DELETE")

        def retryable(error: BaseException) -> bool:
            if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
                return True
            return idempotent and isinstance(error, httpx.TransportError | _ServerError)

        retrying = Retrying(
            retry=retry_if_exception(retryable),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    response = self.http.request(method, path, **kwargs)
                    if response.status_code >= 500:
                        raise _ServerError(response)
        except httpx.HTTPError as error:
            raise Unreachable(f"cannot reach the API at {self.http.base_url}: {error}") from None
        except _ServerError as error:
            raise Unreachable(f"the API at {self.http.base_url} answered {error}") from None
        if response.status_code >= 400:
            kind = _ERRORS.get(response.status_code, InvalidRequest)
            raise kind(response.status_code, _message(response))
        return response
