"""The Python client (services.client) against the real API over an embedded cluster, and job events."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from services.client import Client, Conflict, InvalidRequest, NotFound, Unauthorized, Unreachable
from services.embedded import EmbeddedCluster
from services.scheduler.api import create_app
from services.scheduler.views import JobView
from services.worker.worker import Worker
from shared import data
from shared.spec import JobSpec
from tests.test_byo import byo_spec, records, save_tiny_classifier

TOKEN = "client-token"


@pytest.fixture
def cluster(cache_dir: Path) -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(cache_dir, workers=1) as running:
        yield running


def client_of(cluster: EmbeddedCluster, token: str = TOKEN) -> Client:
    return Client(token=token, http=TestClient(create_app(cluster.scheduler, TOKEN)), attempts=2)


def test_submit_wait_events_download_and_list(
    cluster: EmbeddedCluster, tiny_spec: Callable[..., JobSpec], tmp_path: Path
) -> None:
    seen: list[JobView] = []
    with client_of(cluster) as pwff:
        job_id = pwff.submit(tiny_spec(rounds=2))
        final = pwff.wait(job_id, on_progress=seen.append, poll_s=0.05, timeout_s=300)
        assert final.state == "succeeded"
        assert seen[-1] == final and len(seen) >= 2  # progress saw the job move
        events = pwff.events(job_id)
        assert [e.kind for e in events if e.kind == "state"] == ["state"] * 3
        assert [e.state for e in events if e.kind == "state"] == ["queued", "running", "succeeded"]
        assert [e.round for e in events if e.kind == "round"] == [1, 2]
        assert all("committed with clients" in e.message for e in events if e.kind == "round")
        out = pwff.download(job_id, tmp_path / "results")
        assert (out / "global" / "adapter_config.json").is_file()
        assert json.loads((out / "metrics.json").read_text())["id"] == job_id
        assert (pwff.download(job_id, tmp_path / "c0", client=0) / "adapter_model.safetensors").is_file()
        assert job_id in [job.id for job in pwff.jobs()]
        with pytest.raises(Conflict, match="already succeeded"):
            pwff.cancel(job_id)


def test_api_errors_are_typed_with_the_apis_message(cluster: EmbeddedCluster) -> None:
    with client_of(cluster) as pwff:
        with pytest.raises(NotFound, match="no job nope-123"):
            pwff.status("nope-123")
        with pytest.raises(NotFound):
            pwff.events("nope-123")
        with pytest.raises(InvalidRequest) as invalid:
            pwff.submit({"num_clients": 2, "clients_per_round": 3})
        assert invalid.value.status_code == 422
        assert invalid.value.message == "clients_per_round (3) exceeds num_clients (2)"
        with pytest.raises(InvalidRequest, match=r"^422: model: model '/no/such/model': no such folder$"):
            pwff.submit({"model": "/no/such/model"})


def test_byo_folders_and_files_that_do_not_fit_are_422s(cluster: EmbeddedCluster, tmp_path: Path) -> None:
    model = save_tiny_classifier(tmp_path / "model")
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
    (tmp_path / "not-a-model").mkdir()
    other = [{"text": "hello", "topic": "money"}, {"text": "goal", "topic": "sport"}]
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other), encoding="utf-8")
    with client_of(cluster) as pwff:
        spec = byo_spec(model, {"path": str(notes)}).model_dump(mode="json")
        with pytest.raises(InvalidRequest, match="not a Hugging Face model folder"):
            pwff.submit({**spec, "model": str(tmp_path / "not-a-model")})
        with pytest.raises(InvalidRequest, match="record 1 has no field 'body'"):
            pwff.submit({**spec, "dataset": {**spec["dataset"], "path": str(tmp_path / "other.jsonl")}})
        with pytest.raises(InvalidRequest, match=r"^422: dataset: .*label 'money' is not one of the classes"):
            pwff.submit({**spec, "dataset": {**spec["dataset"], "labels": ["sport", "weather"]}})
        assert pwff.jobs() == []  # nothing was submitted


def test_unauthorized(cluster: EmbeddedCluster) -> None:
    with client_of(cluster, token="wrong") as pwff, pytest.raises(Unauthorized):
        pwff.jobs()


def test_connection_errors_are_retried_then_reported() -> None:
    calls: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ConnectError("connection refused", request=request)

    http = httpx.Client(base_url="http://pwff.invalid", transport=httpx.MockTransport(refuse))
    with Client(http=http, attempts=3) as pwff, pytest.raises(Unreachable, match="cannot reach the API"):
        pwff.jobs()
    assert calls == ["GET"] * 3

    answers = iter([503, 503, 200])

    def flaky(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers), json=[])

    http = httpx.Client(base_url="http://pwff.invalid", transport=httpx.MockTransport(flaky))
    with Client(http=http, attempts=3) as pwff:
        assert pwff.jobs() == []

    posted: list[str] = []

    def broken(request: httpx.Request) -> httpx.Response:
        posted.append(request.method)
        return httpx.Response(502, json={"detail": "bad gateway"})

    http = httpx.Client(base_url="http://pwff.invalid", transport=httpx.MockTransport(broken))
    with Client(http=http, attempts=3) as pwff, pytest.raises(Unreachable, match="502: bad gateway"):
        pwff.submit({})
    assert posted == ["POST"]  # a submit that reached the server is never repeated: no second job


def test_a_client_whose_data_does_not_match_shows_in_the_events(cache_dir: Path, tmp_path: Path) -> None:
    model = save_tiny_classifier(tmp_path / "model")
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
    spec = byo_spec(model, {"path": str(notes)}, rounds=1, round_deadline_s=3.0)
    with EmbeddedCluster(cache_dir, workers=0) as cluster, client_of(cluster) as pwff:
        job_id = pwff.submit(spec)
        pwff_view = pwff.status(job_id)
        while pwff_view.state == "queued":  # the aggregator has read the data and set up round 0
            pwff_view = pwff.status(job_id)
        # Then the shared file changes under the job: the worker finds a class the job does not know.
        rows = [{**r, "topic": "gossip" if r["topic"] == "money" else r["topic"]} for r in records()]
        notes.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        data._splits.cache_clear()
        data._partition_cached.cache_clear()
        stop = threading.Event()
        worker = Worker(cluster.bus, cluster.store, cache_dir=cache_dir, name="late-worker", auth=cluster.auth)
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        try:
            final = pwff.wait(job_id, poll_s=0.1, timeout_s=120)
        finally:
            stop.set()
            thread.join(timeout=30)
            data._splits.cache_clear()
            data._partition_cached.cache_clear()
        events = pwff.events(job_id)
    failures = [e for e in events if e.kind == "client-failed"]
    assert sorted(e.client for e in failures) == [0, 1, 2]
    assert all("label 'gossip' is not one of the classes" in e.message for e in failures)
    # No update arrived: the round reached its deadline below the quorum, and the job says so.
    assert final.state == "failed" and "deadline" in (final.error or "")
    assert events[-1].kind == "state" and events[-1].state == "failed"
