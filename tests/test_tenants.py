"""Tenants of the API (services.scheduler.tenants): tokens hashed at rest, jobs scoped to their tenant,
an admin role, a submission rate limit per tenant, body limits before anything is read, bounded specs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from services.scheduler.api import create_app
from services.scheduler.core import Scheduler
from services.scheduler.tenants import Role, SubmitRateLimiter, Tenants, hash_token
from shared.bus.memory import MemoryBus
from shared.store.memory import MemoryStore

TOKENS = {"team-a": "token-of-team-a", "team-b": "token-of-team-b", "ops": "token-of-ops"}
SPEC: dict[str, Any] = {"name": "tenant-job", "model": "tiny-bert", "num_clients": 4, "clients_per_round": 2}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


@pytest.fixture
def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "team-a": {"tokens_sha256": [hash_token(TOKENS["team-a"]), hash_token("a-second-token")]},
                    "team-b": {"tokens_sha256": [hash_token(TOKENS["team-b"])], "role": "member"},
                    "ops": {"tokens_sha256": [hash_token(TOKENS["ops"])], "role": "admin"},
                }
            }
        )
    )
    return path


@pytest.fixture
def scheduler() -> Scheduler:
    return Scheduler(MemoryBus(), MemoryStore())


@pytest.fixture
def client(scheduler: Scheduler, tenants_file: Path) -> TestClient:
    return TestClient(create_app(scheduler, Tenants.from_file(tenants_file)))


def submit(client: TestClient, tenant: str) -> str:
    response = client.post("/v1/jobs", json=SPEC, headers=auth(tenant))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_the_file_holds_hashes_and_any_listed_token_works(tenants_file: Path) -> None:
    text = tenants_file.read_text()
    assert all(token not in text for token in TOKENS.values())
    tenants = Tenants.from_file(tenants_file)
    a = tenants.authenticate(TOKENS["team-a"])
    assert a is not None and a.name == "team-a" and a.role == Role.MEMBER  # member is the default role
    assert tenants.authenticate("a-second-token") == a
    ops = tenants.authenticate(TOKENS["ops"])
    assert ops is not None and ops.admin
    assert tenants.authenticate("") is None and tenants.authenticate(hash_token(TOKENS["ops"])) is None


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("tenants: {}", "tenants"),
        ("tenants: {a: {tokens_sha256: [abc]}}", "SHA-256"),
        ("tenants: {a: {tokens_sha256: ['" + "0" * 64 + "'], role: root}}", "role"),
        ("tenants: {a: {tokens_sha256: ['" + "0" * 64 + "'], roles: admin}}", "roles"),
        ("tenants: {A B: {tokens_sha256: ['" + "0" * 64 + "']}}", "tenant name"),
        ("tenants: {a: {tokens_sha256: ['" + "0" * 64 + "']}, b: {tokens_sha256: ['" + "0" * 64 + "']}}", "two"),
        ("[not: a map", "tenants file"),
    ],
)
def test_a_bad_tenants_file_is_refused_with_its_reason(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=error):
        Tenants.from_file(path)


def test_the_api_token_alone_is_one_admin_tenant(scheduler: Scheduler) -> None:
    client = TestClient(create_app(scheduler, "quick-start-token"))
    job_id = scheduler.submit(scheduler_spec(), tenant="someone-else")
    listed = client.get("/v1/jobs", headers={"Authorization": "Bearer quick-start-token"})
    assert listed.status_code == 200 and [job["id"] for job in listed.json()] == [job_id]
    with pytest.raises(ValueError, match="token"):
        Tenants.single("")


def scheduler_spec() -> Any:
    from shared.spec import parse_spec

    return parse_spec(SPEC)


ROUTES = [
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{job}"),
    ("GET", "/v1/jobs/{job}/events"),
    ("DELETE", "/v1/jobs/{job}"),
    ("DELETE", "/v1/jobs/{job}?purge=true"),
    ("GET", "/v1/jobs/{job}/models/global"),
    ("GET", "/v1/jobs/{job}/models/clients/0"),
    ("POST", "/v1/jobs/{job}/generate"),
    ("POST", "/v1/jobs/{job}/adapt"),
    ("GET", "/v1/jobs/{job}/adaptations/0123456789ab/model"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_401_without_a_valid_token(client: TestClient, method: str, path: str) -> None:
    job_id = submit(client, "team-a")
    url = path.format(job=job_id)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKENS['ops']}"}):
        response = client.request(method, url, headers=headers, json={})
        assert response.status_code == 401, (method, url, headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), [route for route in ROUTES if "{job}" in route[1]])
def test_another_tenants_job_is_a_404(client: TestClient, scheduler: Scheduler, method: str, path: str) -> None:
    job_id = submit(client, "team-a")
    body = {"examples": [{"text": "hi"}]} if path.endswith("/adapt") else {"prompt": "hi"}
    response = client.request(method, path.format(job=job_id), headers=auth("team-b"), json=body)
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": f"no job {job_id}"}  # the same answer as for a job that never existed
    assert scheduler.jobs.state(job_id) == "queued"  # neither cancelled nor purged


def test_lists_show_only_the_callers_jobs_and_an_admin_sees_all(client: TestClient) -> None:
    a1, b1, a2 = submit(client, "team-a"), submit(client, "team-b"), submit(client, "team-a")

    def listed(tenant: str) -> list[str]:
        response = client.get("/v1/jobs", headers=auth(tenant))
        assert response.status_code == 200
        return [job["id"] for job in response.json()]

    assert listed("team-a") == [a2, a1]
    assert listed("team-b") == [b1]
    assert listed("ops") == [a2, b1, a1]
    view = client.get(f"/v1/jobs/{b1}", headers=auth("ops"))
    assert view.status_code == 200 and view.json()["tenant"] == "team-b"
    assert client.get(f"/v1/jobs/{a1}", headers=auth("team-a")).json()["tenant"] == "team-a"
    # The owner and an admin may cancel; the admin may purge.
    assert client.delete(f"/v1/jobs/{a1}", headers=auth("team-a")).json()["state"] == "cancelled"
    assert client.delete(f"/v1/jobs/{b1}", headers=auth("ops")).json()["state"] == "cancelled"
    assert client.delete(f"/v1/jobs/{b1}?purge=true", headers=auth("ops")).json()["purged"] is True
    assert listed("team-b") == []


def test_submissions_over_the_rate_limit_are_429_per_tenant(scheduler: Scheduler, tenants_file: Path) -> None:
    now = [1000.0]
    limiter = SubmitRateLimiter(per_minute=6, burst=2, clock=lambda: now[0])
    client = TestClient(create_app(scheduler, Tenants.from_file(tenants_file), submit_limit=limiter))
    submit(client, "team-a")
    submit(client, "team-a")
    over = client.post("/v1/jobs", json=SPEC, headers=auth("team-a"))
    assert over.status_code == 429
    assert over.headers["retry-after"] == "10"  # 6 a minute: one token every 10 s
    assert "rate limit" in over.json()["detail"]
    assert len(scheduler.list_jobs()) == 2  # nothing was created
    submit(client, "team-b")  # another tenant has its own bucket
    now[0] += 5
    assert client.post("/v1/jobs", json=SPEC, headers=auth("team-a")).headers["retry-after"] == "5"
    now[0] += 5
    submit(client, "team-a")


async def _post_chunks(app: Any, headers: list[tuple[bytes, bytes]], chunks: int, size: int) -> tuple[int, int]:
    """POST /v1/jobs straight through the ASGI app, the body in `chunks` messages of `size` bytes each.

    Returns the response status and how many body bytes the app pulled (TestClient would read the whole
    body up front, so it cannot tell)."""
    pulled = 0
    sent = 0
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled, sent
        if sent >= chunks:
            return {"type": "http.disconnect"}
        sent += 1
        pulled += size
        return {"type": "http.request", "body": b"x" * size, "more_body": sent < chunks}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    return statuses[0], pulled


@pytest.mark.parametrize("token", [None, "team-a"], ids=["anonymous", "with-token"])
def test_a_body_over_the_limit_is_413_before_it_is_read(scheduler: Scheduler, tenants_file: Path, token: Any) -> None:
    app = create_app(scheduler, Tenants.from_file(tenants_file), max_body_bytes=10_000)
    headers = [(b"authorization", f"Bearer {TOKENS[token]}".encode())] if token else []
    # Declared: refused from the header alone, nothing of the body is pulled.
    status, pulled = asyncio.run(_post_chunks(app, [*headers, (b"content-length", b"50000000")], 50_000, 1000))
    assert (status, pulled) == (413, 0)
    # Chunked (no length): refused as soon as the limit is passed; the other 50 MB are never pulled.
    status, pulled = asyncio.run(_post_chunks(app, headers, 50_000, 1000))
    assert status == 413 and pulled <= 11_000
    assert scheduler.list_jobs() == []
    # And through a real HTTP client, with the documented answer.
    client = TestClient(app)
    response = client.post(
        "/v1/jobs", content=b"{" + b" " * 20_000 + b"}", headers=dict((k.decode(), v.decode()) for k, v in headers)
    )
    assert response.status_code == 413 and response.json() == {"detail": "request body larger than 10000 bytes"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"eval_max_examples": 70_000_000_000_000}, "eval_max_examples"),
        ({"budget": {"device_deadline_s": 5.8e307}}, "device_deadline_s"),
        ({"round_deadline_s": 1e12}, "round_deadline_s"),
        ({"rounds": 10**9}, "rounds"),
        ({"num_clients": 10**9}, "num_clients"),
        ({"clients_per_round": 10**9}, "clients_per_round"),
        ({"local_steps": 10**9}, "local_steps"),
        ({"lora": {"target_modules": ["query"] * 1000}}, "target_modules"),
        ({"lora": {"target_modules": ["q" * 5000]}}, "target_modules"),
        ({"personalization": {"personal": ["*"] * 1000}}, "personal"),
        ({"name": "n" * 1000}, "name"),
        ({"num_clients": 4, "clients_per_round": 5}, "clients_per_round"),
    ],
)
def test_out_of_range_spec_fields_are_422_naming_the_field(
    client: TestClient, scheduler: Scheduler, change: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/jobs", json={**SPEC, **change}, headers=auth("team-a"))
    assert response.status_code == 422, response.text
    assert field in response.text
    assert scheduler.list_jobs() == []
