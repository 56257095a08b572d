"""The HTTP API over a Scheduler on the in-process bus and store (the round loop is not running)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.scheduler.api import create_app
from services.scheduler.core import Scheduler
from shared.bus import Queues
from shared.bus.memory import MemoryBus
from shared.messages import DropJob, InitJob, decode_aggregator
from shared.spec import load_spec_file
from shared.state import JobState
from shared.store import Keys
from shared.store.memory import MemoryStore

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC: dict[str, Any] = {
    "name": "api-test",
    "model": "tiny-bert",
    "dataset": "bbc-news",
    "num_clients": 4,
    "clients_per_round": 2,
    "rounds": 2,
}

ROUTES = [
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/some-job-123"),
    ("DELETE", "/v1/jobs/some-job-123"),
    ("GET", "/v1/jobs/some-job-123/models/global"),
    ("GET", "/v1/jobs/some-job-123/models/clients/0"),
]


@pytest.fixture
def scheduler() -> Scheduler:
    return Scheduler(MemoryBus(), MemoryStore())


@pytest.fixture
def client(scheduler: Scheduler) -> TestClient:
    return TestClient(create_app(scheduler, TOKEN))


def _drain(scheduler: Scheduler, queue: str) -> list[bytes]:
    bodies: list[bytes] = []
    for _ in range(scheduler.bus.depth(queue)):
        stop = threading.Event()

        def take(body: bytes, stop: threading.Event = stop) -> None:
            bodies.append(body)
            stop.set()

        scheduler.bus.consume(queue, take, stop)
    return bodies


def _submit(client: TestClient, **overrides: Any) -> str:
    response = client.post("/v1/jobs", json={**SPEC, **overrides}, headers=AUTH)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def test_app_refuses_to_start_without_a_token(scheduler: Scheduler) -> None:
    with pytest.raises(ValueError, match="token"):
        create_app(scheduler, "")


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["none", "wrong", "basic", "bare", "suffix"],
)
def test_every_v1_route_needs_the_token(
    client: TestClient, scheduler: Scheduler, method: str, path: str, headers: dict[str, str]
) -> None:
    response = client.request(method, path, headers=headers, json=SPEC if method == "POST" else None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert scheduler.list_jobs() == []  # nothing happened behind the refusal


def test_submit_creates_a_queued_job_and_asks_for_init(client: TestClient, scheduler: Scheduler) -> None:
    response = client.post("/v1/jobs", json=SPEC, headers=AUTH)
    assert response.status_code == 201
    job_id = response.json()["id"]
    assert set(response.json()) == {"id"}
    assert job_id.startswith("api-test-")
    assert scheduler.store.hash_get(Keys().job(job_id), "state") == JobState.QUEUED
    assert [decode_aggregator(b) for b in _drain(scheduler, Queues().aggregate)] == [InitJob(job_id=job_id)]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_clients": -1}, "num_clients"),
        ({"roundz": 3}, "roundz"),
        ({"optimizer": {"lr": 0}}, "lr"),
        ({"optimizer": {"learning_rate": 0.1}}, "learning_rate"),
        ({"model": "gpt-17"}, "model"),
        ({"clients_per_round": 9}, "clients_per_round"),
    ],
)
def test_invalid_spec_is_422_naming_the_field(
    client: TestClient, scheduler: Scheduler, overrides: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/jobs", json={**SPEC, **overrides}, headers=AUTH)
    assert response.status_code == 422
    assert field in response.text
    assert scheduler.list_jobs() == []
    assert scheduler.bus.depth(Queues().aggregate) == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clients": {"kind": "bound", "ids": ["site-a", "site-b"]}, "num_clients": 2}, "batches pool clients only"),
        ({"secure_aggregation": {"enabled": True}}, "not supported with secure_aggregation"),
        ({"clients_per_task": 0}, "clients_per_task"),
    ],
)
def test_batched_tasks_where_they_cannot_work_are_422(
    client: TestClient, scheduler: Scheduler, overrides: dict[str, Any], message: str
) -> None:
    response = client.post("/v1/jobs", json={**SPEC, "clients_per_task": 4, **overrides}, headers=AUTH)
    assert response.status_code == 422
    assert message in response.text
    assert scheduler.list_jobs() == []


def test_model_dataset_mismatch_is_422(client: TestClient, scheduler: Scheduler) -> None:
    response = client.post("/v1/jobs", json={**SPEC, "dataset": "jane-austen"}, headers=AUTH)
    assert response.status_code == 422
    assert "cannot train on dataset 'jane-austen'" in response.text
    assert scheduler.list_jobs() == []


def test_non_json_body_is_422(client: TestClient) -> None:
    response = client.post("/v1/jobs", content=b"rounds: 3", headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422


def test_get_job(client: TestClient) -> None:
    job_id = _submit(client, rounds=3)
    response = client.get(f"/v1/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 200
    job = response.json()
    assert job["id"] == job_id and job["name"] == "api-test"
    assert job["state"] == "queued" and job["round"] == 0 and job["rounds"] == 3
    assert job["error"] is None and job["metrics"] == []
    assert job["spec"]["model"] == "tiny-bert" and job["spec"]["optimizer"]["lr"] == 1e-3  # defaults filled in
    assert job["created_at"] <= job["updated_at"]


def test_list_jobs_newest_first(client: TestClient) -> None:
    assert client.get("/v1/jobs", headers=AUTH).json() == []
    first = _submit(client, name="first")
    second = _submit(client, name="second")
    listed = client.get("/v1/jobs", headers=AUTH).json()
    assert [job["id"] for job in listed] == [second, first]
    assert [job["name"] for job in listed] == ["second", "first"]
    assert all(job["state"] == "queued" for job in listed)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/nope-123"),
        ("DELETE", "/v1/jobs/nope-123"),
        ("GET", "/v1/jobs/nope-123/models/global"),
        ("GET", "/v1/jobs/nope-123/models/clients/0"),
    ],
)
def test_unknown_job_is_404(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path, headers=AUTH)
    assert response.status_code == 404
    assert "nope-123" in response.json()["detail"]


def test_cancel_then_cancel_again_is_409(client: TestClient, scheduler: Scheduler) -> None:
    job_id = _submit(client)
    scheduler.bus.purge(Queues().aggregate)
    response = client.delete(f"/v1/jobs/{job_id}", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["state"] == "cancelled"
    # The aggregator is told to forget the job.
    assert [decode_aggregator(b) for b in _drain(scheduler, Queues().aggregate)] == [DropJob(job_id=job_id)]

    again = client.delete(f"/v1/jobs/{job_id}", headers=AUTH)
    assert again.status_code == 409
    assert "already cancelled" in again.json()["detail"]


def test_models_are_404_before_anything_is_published(client: TestClient) -> None:
    job_id = _submit(client)
    for path in (f"/v1/jobs/{job_id}/models/global", f"/v1/jobs/{job_id}/models/clients/1"):
        response = client.get(path, headers=AUTH)
        assert response.status_code == 404
        assert "has not published a model yet" in response.json()["detail"]


def test_published_model_downloads_as_gzip(client: TestClient, scheduler: Scheduler) -> None:
    job_id = _submit(client)
    scheduler.store.put(Keys().model_archive(job_id, "global"), b"\x1f\x8bfake-archive")
    response = client.get(f"/v1/jobs/{job_id}/models/global", headers=AUTH)
    assert response.status_code == 200
    assert response.content == b"\x1f\x8bfake-archive"
    assert response.headers["content-type"] == "application/gzip"
    assert f'filename="{job_id}-global.tar.gz"' in response.headers["content-disposition"]
    # A client's personalized model is published by the client-side evaluation at the end.
    assert client.get(f"/v1/jobs/{job_id}/models/clients/3", headers=AUTH).status_code == 404
    scheduler.store.put(Keys().model_archive(job_id, "client-3"), b"\x1f\x8bclient-archive")
    client_response = client.get(f"/v1/jobs/{job_id}/models/clients/3", headers=AUTH)
    assert client_response.status_code == 200 and client_response.content == b"\x1f\x8bclient-archive"
    assert f'filename="{job_id}-client-3.tar.gz"' in client_response.headers["content-disposition"]


@pytest.mark.parametrize("client_id", [4, 100, -1])
def test_client_model_out_of_range_is_404(client: TestClient, scheduler: Scheduler, client_id: int) -> None:
    job_id = _submit(client)
    scheduler.store.put(Keys().model_archive(job_id, "global"), b"archive")
    response = client.get(f"/v1/jobs/{job_id}/models/clients/{client_id}", headers=AUTH)
    assert response.status_code == 404
    assert "out of range" in response.json()["detail"]


def test_healthz_needs_no_token(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.fixture
def running(scheduler: Scheduler) -> Iterator[Scheduler]:
    """The scheduler with its event loop consuming, as `python -m services.scheduler` runs it."""
    stop = threading.Event()
    loop = threading.Thread(target=scheduler.run, args=(stop,), daemon=True)
    loop.start()
    deadline = time.monotonic() + 10
    while not scheduler.bus.consumer_status(scheduler.queues.events).running and time.monotonic() < deadline:
        time.sleep(0.01)
    yield scheduler
    stop.set()
    loop.join(timeout=10)


def test_readyz_reports_consumer_broker_and_store(running: Scheduler) -> None:
    response = TestClient(create_app(running, TOKEN)).get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "consumer": True, "broker": True, "store": True, "state": True}


def test_readyz_is_503_without_the_event_loop(client: TestClient) -> None:
    response = client.get("/readyz")  # the loop never started: the API would accept jobs nothing runs
    assert response.status_code == 503
    # ...nor read the store's instance marker (the loop does that first)
    assert response.json() == {"ready": False, "consumer": False, "broker": False, "store": True, "state": False}


def test_readyz_is_503_when_the_store_is_down(running: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(running.store, "ping", lambda: False)
    response = TestClient(create_app(running, TOKEN)).get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "consumer": True, "broker": True, "store": False, "state": True}


def test_metrics_are_prometheus_text_with_pwff_names(client: TestClient) -> None:
    _submit(client)
    client.get("/v1/jobs", headers=AUTH)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "pwff_jobs_submitted_total",
        "pwff_jobs_running",
        "pwff_updates_received_total",
        "pwff_http_requests_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text
    assert 'pwff_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert "pwff_jobs_submitted_total " in text


def test_http_requests_are_counted_by_route_template(client: TestClient) -> None:
    labels = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "404"}
    before = REGISTRY.get_sample_value("pwff_http_requests_total", labels) or 0.0
    client.get("/v1/jobs/abc-123", headers=AUTH)
    client.get("/v1/jobs/xyz-456", headers=AUTH)
    assert REGISTRY.get_sample_value("pwff_http_requests_total", labels) == before + 2


# -- the HTTP contract (see also tests/test_openapi.py) ------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"seed": False}, "seed"),
        ({"rounds": "3"}, "rounds"),
        ({"num_clients": True}, "num_clients"),
        ({"lora": {"train_head": 1}}, "train_head"),
        ({"optimizer": {"lr": "0.1"}}, "lr"),
        ({"optimizer": {"lr": True}}, "lr"),
        ({"name": 7}, "name"),
    ],
)
def test_a_submitted_spec_is_not_coerced_from_other_json_types(
    client: TestClient, scheduler: Scheduler, overrides: dict[str, Any], field: str
) -> None:
    # Regression: pydantic's lax mode took `false` for 0 and "3" for 3, which the schema forbids.
    response = client.post("/v1/jobs", json={**SPEC, **overrides}, headers=AUTH)
    assert response.status_code == 422, response.text
    assert [error["loc"][-1] for error in response.json()["detail"]] == [field]
    assert scheduler.list_jobs() == []


def test_a_submitted_spec_takes_numbers_as_json_schema_does(client: TestClient) -> None:
    # An integer where a float is expected is a number; an integral number is an integer.
    job_id = _submit(client, rounds=3.0, optimizer={"lr": 1}, fwd={"perturbations_per_task": 4.0})
    spec = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()["spec"]
    assert spec["rounds"] == 3 and spec["optimizer"]["lr"] == 1.0 and spec["fwd"]["perturbations_per_task"] == 4


def test_spec_files_stay_lax(tmp_path: Path) -> None:
    # YAML reads 1e-3 as a string: the strict reading is the HTTP edge's only.
    path = tmp_path / "spec.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\nseed: '5'\n")
    spec = load_spec_file(str(path), ["fwd.lr=2e-2"])
    assert spec.optimizer.lr == 1e-3 and spec.seed == 5 and spec.fwd.lr == 2e-2


def test_device_profiles_must_list_every_client(client: TestClient, scheduler: Scheduler) -> None:
    # Such a spec used to be accepted and fail every round on the way (profiles_for raises).
    profiles = [{"bandwidth_hz": 2e6}, {"tx_power_w": 0.1}]
    response = client.post("/v1/jobs", json={**SPEC, "devices": {"profiles": profiles}}, headers=AUTH)
    assert response.status_code == 422
    assert "devices.profiles lists 2 profiles but num_clients is 4" in response.text
    assert client.post("/v1/jobs", json={**SPEC, "devices": {"profiles": []}}, headers=AUTH).status_code == 422
    _submit(client, devices={"profiles": [*profiles, *profiles]})
    assert len(scheduler.list_jobs()) == 1


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("OPTIONS", "/v1/jobs", "GET, POST"),
        ("PUT", "/v1/jobs", "GET, POST"),
        ("PATCH", "/v1/jobs/some-job-123", "GET, DELETE"),
        ("POST", "/v1/jobs/some-job-123/models/global", "GET"),
        ("DELETE", "/healthz", "GET"),
    ],
)
def test_405_allows_every_method_of_the_path(client: TestClient, method: str, path: str, allow: str) -> None:
    # Regression: Starlette answered from the first route of the path (`Allow: POST` on /v1/jobs).
    response = client.request(method, path, headers=AUTH)
    assert response.status_code == 405
    assert response.headers["allow"] == allow


def _chunks(size: int) -> Iterator[bytes]:
    yield b'{"name": "'
    for _ in range(size // 100):
        yield b"x" * 100
    yield b'"}'


@pytest.mark.parametrize("streamed", [False, True], ids=["declared", "streamed"])
def test_a_body_over_the_limit_is_413(scheduler: Scheduler, streamed: bool) -> None:
    client = TestClient(create_app(scheduler, TOKEN, max_body_bytes=1000))
    headers = {**AUTH, "Content-Type": "application/json"}
    body = _chunks(5000) if streamed else b"".join(_chunks(5000))
    # Regression (streamed): a chunked body over the limit was answered 400, FastAPI's answer to
    # any error raised while it reads a body.
    response = client.post("/v1/jobs", content=body, headers=headers)
    assert response.status_code == 413
    assert response.json() == {"detail": "request body larger than 1000 bytes"}
    assert scheduler.list_jobs() == []
    under = client.post("/v1/jobs", content=_chunks(500), headers=headers)
    assert under.status_code == 422 and "name" in under.text  # read whole, then validated
    assert client.post("/v1/jobs", content=iter([b"{", b"}"]), headers=headers).status_code == 201


def test_an_unreadable_body_is_400(client: TestClient) -> None:
    response = client.post("/v1/jobs", content=b"\xff\n\xff", headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"detail": "There was an error parsing the body"}
