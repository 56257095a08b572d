"""The API keeps the contract its /openapi.json documents: schemathesis against the API served by uvicorn.

The app runs in a real uvicorn server on a local port, as `python -m services.scheduler` serves it, and
schemathesis reads /openapi.json from it and calls it over HTTP: uvicorn's HTTP parsing, its handling
of bodies (the 413 limit reads the stream as uvicorn delivers it) and its error responses are part of
what is checked, which an in-process ASGI transport would skip.

Every operation is fuzzed with schema-valid and schema-violating requests and every response is
checked (status code documented, content type, response schema and headers, no 5xx, schema-valid
requests accepted and invalid ones rejected, 405 with a truthful `Allow`, 401 without the token).
Operations on one job need a job that exists to get past 404, so a few explicit cases follow.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import settings
from schemathesis.config import ChecksConfig, SchemathesisConfig
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode

from services.scheduler.api import create_app
from services.scheduler.core import Scheduler
from shared.bus.memory import MemoryBus
from shared.catalog import DATASETS, MODELS, dataset_info, model_info
from shared.messages import ClientFailed, encode
from shared.registry import PRESETS
from shared.spec import _LABEL_KEY, FULL_FINETUNING_MAX_STATE_BYTES, JobSpec
from shared.state.records import RoundRecord
from shared.state.rounds import RoundCommit
from shared.store import Keys
from shared.store.memory import MemoryStore
from shared.wireless import DevicePopulation
from tests.harness import free_port

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEED = 20240417
MAX_EXAMPLES = 25

SCHEDULER = Scheduler(MemoryBus(), MemoryStore())
APP = create_app(SCHEDULER, TOKEN)
OPENAPI: dict[str, Any] = APP.openapi()
# A body over the API's limit is refused with its documented 413 before anything reads it, whether
# it is schema-valid (10,000 explicit device profiles are) or not (10,001 are too many).
TOO_LARGE = "413"
DEFAULTS = ChecksConfig()
CONFIG = {
    # Explicit (no schemathesis.toml is looked up) and seeded, so a CI run is reproducible.
    "seed": SEED,
    "headers": AUTH,
    "generation": {"max-examples": MAX_EXAMPLES},
    "checks": {
        "negative_data_rejection": {
            "expected-statuses": [*DEFAULTS.negative_data_rejection.expected_statuses, TOO_LARGE]
        },
        "positive_data_acceptance": {
            "expected-statuses": [*DEFAULTS.positive_data_acceptance.expected_statuses, TOO_LARGE]
        },
    },
}


@pytest.fixture(autouse=True, scope="module")
def _event_loop() -> Iterator[None]:
    """The scheduler's event loop runs, as in `python -m services.scheduler`: /readyz is a 503 without it."""
    stop = threading.Event()
    loop = threading.Thread(target=SCHEDULER.run, args=(stop,), name="scheduler-loop", daemon=True)
    loop.start()
    yield
    stop.set()
    loop.join(timeout=10)
    SERVER.should_exit = True


def _serve(port: int) -> uvicorn.Server:
    """APP in a uvicorn server on 127.0.0.1:`port`, in a daemon thread, started before this returns.

    Started at import: schemathesis reads the schema from the running server when the tests are collected.
    """
    server = uvicorn.Server(uvicorn.Config(APP, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    threading.Thread(target=server.run, name="uvicorn", daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 30 s")
        time.sleep(0.05)
    return server


SERVER = _serve(free_port())
BASE_URL = f"http://127.0.0.1:{SERVER.config.port}"
SCHEMA = schemathesis.openapi.from_url(f"{BASE_URL}/openapi.json", config=SchemathesisConfig.from_dict(CONFIG))


def test_the_served_document_is_the_apps() -> None:
    assert SCHEMA.raw_schema == OPENAPI
    assert SCHEMA.get_base_url().rstrip("/") == BASE_URL  # every call goes to the live server


# -- the rules between fields --------------------------------------------------------------------


def consistent(body: Any) -> Any:
    """A schema-valid spec made to keep the rules between fields that JSON Schema cannot state.

    JobSpec's description lists them (clients_per_round <= num_clients, a model and a data set of
    the same task, ...); the API answers 422 to a spec that breaks one, so a generated spec that
    is to be accepted is brought in line first, staying schema-valid.
    """
    if not isinstance(body, dict):
        return body
    defaults = JobSpec()
    spec: dict[str, Any] = {key: dict(value) if isinstance(value, dict) else value for key, value in body.items()}
    devices: dict[str, Any] = spec.get("devices") or {}
    if devices.get("profiles"):
        spec["num_clients"] = len(devices["profiles"])
    if "population" in devices:
        population = devices["population"] = dict(devices["population"])
        # A preset replaces the defaults of the fields it names: order against those.
        preset_defaults = DevicePopulation.model_validate({"preset": population.get("preset", "default")})
        for name in ("bandwidth_hz", "tx_power_w", "path_loss_db", "flops_per_s", "joules_per_flop", "memory_mb"):
            low, high = f"{name}_min", f"{name}_max"
            floor = population.get(low, getattr(preset_defaults, low))
            ceiling = population.get(high, getattr(preset_defaults, high))
            if floor > ceiling:
                population[low], population[high] = ceiling, floor
    clients: dict[str, Any] = spec.get("clients") or {}
    if clients.get("kind", defaults.clients.kind) == "bound":  # distinct ids, one per client
        ids = list(dict.fromkeys(clients.get("ids") or [])) or ["site-a"]
        spec["clients"], spec["num_clients"] = {**clients, "ids": ids}, len(ids)
    elif clients.get("ids") is not None:
        spec["clients"] = {key: value for key, value in clients.items() if key != "ids"}
    num_clients: int = spec.get("num_clients", defaults.num_clients)
    if spec.get("clients_per_round", defaults.clients_per_round) > num_clients:
        spec["clients_per_round"] = num_clients
    resources = spec.get("resources")
    if isinstance(resources, dict) and isinstance(resources.get("node_selector"), dict):
        # The generator does not always keep to propertyNames and additionalProperties of a map (a
        # key off the label pattern, a non-string value): keep the entries the schema allows.
        allowed = re.compile(_LABEL_KEY)
        selector = {k: v for k, v in resources["node_selector"].items() if allowed.match(k) and isinstance(v, str)}
        spec["resources"] = {**resources, "node_selector": {k: v for k, v in selector.items() if len(v) <= 63}}
    # No local model folder or data file exists here: a generated path becomes a packaged entry
    # (the 422s for folders and files are tested in tests/test_byo.py).
    if spec.get("model", defaults.model) not in MODELS:
        spec["model"] = defaults.model
    if isinstance(spec.get("dataset"), dict):
        spec["dataset"] = defaults.dataset
    task = model_info(spec.get("model", defaults.model)).task
    partition: dict[str, Any] = spec.get("partition") or {}
    natural = partition.get("kind", defaults.partition.kind) == "natural"
    dataset = dataset_info(spec.get("dataset", defaults.dataset))
    if dataset.task != task or (natural and not dataset.natural_groups):
        names = [name for name in DATASETS if dataset_info(name).task == task]
        grouped = [name for name in names if dataset_info(name).natural_groups]
        spec["dataset"] = grouped[0] if natural and grouped else names[0]
        if natural and not grouped:
            spec["partition"] = {**partition, "kind": "iid"}
    if spec.get("mode") == "align":
        if task != "causal-lm":
            spec["model"] = "tiny-llama"
        spec["dataset"] = body.get("dataset", defaults.dataset)  # any data set gives prompts
        if isinstance(spec["dataset"], dict):  # but no local source exists here
            spec["dataset"] = defaults.dataset
    _consistent_alignment(spec)
    lora: dict[str, Any] = spec.get("lora") or {}
    if lora.get("full"):  # full fine-tuning: backprop, a preset without LoRA tensors, a model that fits
        if 4 * model_info(spec.get("model", defaults.model)).num_params > FULL_FINETUNING_MAX_STATE_BYTES:
            spec["lora"] = {**lora, "full": False}
        else:
            spec["mode"] = "backprop"
            personalization = spec["personalization"] = dict(spec.get("personalization") or {})
            if PRESETS[personalization.get("preset", defaults.personalization.preset)].needs_lora:
                personalization["preset"] = "none"
    fwd: dict[str, Any] = spec.get("fwd") or {}
    per_task = fwd.get("perturbations_per_task", defaults.fwd.perturbations_per_task)
    if fwd.get("max_perturbations_per_step", defaults.fwd.max_perturbations_per_step) < per_task:
        fwd["max_perturbations_per_step"] = per_task
    per_local_step = fwd.get("perturbations_per_local_step", defaults.fwd.perturbations_per_local_step)
    if fwd.get("max_perturbations_per_local_step", defaults.fwd.max_perturbations_per_local_step) < per_local_step:
        fwd["max_perturbations_per_local_step"] = per_local_step
    if fwd.get("upload", defaults.fwd.upload) == "pool":
        fwd["regime"] = "local"
    _consistent_robust(spec, defaults)
    if spec.get("privacy"):  # DP-FedAvg: fedavg over uniform weights, on modes that upload deltas
        spec["aggregation"] = {**(spec.get("aggregation") or {}), "strategy": "fedavg", "weighting": "uniform"}
        mode = spec.get("mode", defaults.mode)
        if mode == "fwd":
            spec["fwd"] = {**fwd, "regime": "local"}
        if mode not in ("backprop", "align"):
            spec["privacy"] = {**spec["privacy"], "noise": "server"}
    return spec


def _consistent_robust(spec: dict[str, Any], defaults: JobSpec) -> None:
    """Robust strategies sized to the round (Krum: n > 2f + 2; trimmed mean trims one), on deltas; poison on
    delta uploads only."""
    mode = spec.get("mode", defaults.mode)
    aggregation: dict[str, Any] = dict(spec.get("aggregation") or {})
    robust: dict[str, Any] = dict(aggregation.get("robust") or {})
    strategy = aggregation.get("strategy", defaults.aggregation.strategy)
    n: int = spec.get("clients_per_round", defaults.clients_per_round)
    regime = (spec.get("fwd") or {}).get("regime", defaults.fwd.regime)
    if (mode == "fwd" and regime != "local") or (strategy == "krum" and n < 3):
        strategy = "fedavg"
    if strategy == "krum":
        byzantine = robust["byzantine"] = min(
            robust.get("byzantine", defaults.aggregation.robust.byzantine), (n - 3) // 2
        )
        selected = robust.get("krum_selected", defaults.aggregation.robust.krum_selected)
        robust["krum_selected"] = min(selected, n - byzantine)
    if (
        strategy == "trimmed_mean"
        and int(robust.get("trim_fraction", defaults.aggregation.robust.trim_fraction) * n + 1e-9) < 1
    ):
        strategy = "median"
    spec["aggregation"] = {**aggregation, "strategy": strategy, "robust": robust}
    simulation: dict[str, Any] = dict(spec.get("simulation") or {})
    if mode not in ("backprop", "align") and simulation.get("poison"):
        simulation["poison"] = {**simulation["poison"], "fraction": 0.0}
    spec["simulation"] = simulation


def _consistent_alignment(spec: dict[str, Any]) -> None:
    """Reward names unique, no `hf` folder (none exists here), and weights that fit the rewards."""
    align: dict[str, Any] = dict(spec.get("align") or {})
    spec["align"] = align
    rewards = [dict(reward) for reward in align.get("rewards") or [{"kind": "relevance"}, {"kind": "positivity"}]]
    for index, reward in enumerate(rewards):
        reward["name"] = f"r{index}"
        if reward.get("kind") == "hf":
            reward.update(kind="relevance", path=None)
        if reward.get("kind") == "keyword" and not reward.get("keyword"):
            reward["keyword"] = "yes"
    align["rewards"] = rewards
    even = [1.0 / len(rewards)] * len(rewards)
    even[-1] = 1.0 - sum(even[:-1])
    align["preferences"] = {"kind": "groups", "groups": [even]}


# -- the property test ---------------------------------------------------------------------------


@SCHEMA.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
)
def test_every_operation_keeps_its_documented_contract(case: schemathesis.Case) -> None:
    positive = case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE
    if positive and case.method == "POST" and case.path == "/v1/jobs":
        case.body = consistent(case.body)
    response = case.call_and_validate()
    # CONFIG's headers carry the token: a 401 is only for the requests that leave it out or spoil it.
    assert response.status_code != 401 or response.request.headers.get("Authorization") != AUTH["Authorization"]


def test_the_property_test_covers_every_operation() -> None:
    results = list(SCHEMA.get_all_operations())
    assert all(isinstance(result, Ok) for result in results)
    operations = {(result.ok().method.upper(), result.ok().path) for result in results if isinstance(result, Ok)}
    assert operations == {
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_id}"),
        ("GET", "/v1/jobs/{job_id}/events"),
        ("DELETE", "/v1/jobs/{job_id}"),
        ("GET", "/v1/jobs/{job_id}/models/global"),
        ("GET", "/v1/jobs/{job_id}/models/clients/{client}"),
        ("POST", "/v1/jobs/{job_id}/adapt"),
        ("POST", "/v1/jobs/{job_id}/generate"),
        ("GET", "/v1/jobs/{job_id}/adaptations/{adaptation_id}/model"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    }


# -- the operations on one job, with a job that exists -------------------------------------------


def _call(method: str, path: str, **kwargs: Any) -> Any:
    case = SCHEMA[path][method].Case(**kwargs)
    return case.call_and_validate(headers=AUTH)


def _committed_job() -> str:
    """A job with two committed rounds (one with client evaluations) and published models."""
    response = _call(
        "POST", "/v1/jobs", body={"name": "contract", "model": "tiny-bert", "num_clients": 4, "clients_per_round": 2}
    )
    job_id: str = response.json()["id"]
    archive = b"\x1f\x8bfake-archive"
    SCHEDULER.state.rounds.commit(
        job_id, RoundCommit(record=RoundRecord(round=0, metrics={"accuracy": 0.25, "loss": 1.4}), state=b"")
    )
    record = RoundRecord(
        round=1,
        clients=[0, 2],
        metrics={"accuracy": 0.5, "loss": float("nan"), "train_loss": 1.1, "bytes_up": 2048.0, "delay_s": 3.5},
        extra={"devices": {"0": {"delay_s": 3.5, "energy_j": 0.2}}},
    )
    SCHEDULER.state.rounds.commit(job_id, RoundCommit(record=record, state=b"", archive=archive))
    for client in (0, 2):
        figures = {"global_accuracy": 0.5, "global_loss": 1.0, "personalized_accuracy": 0.75}
        SCHEDULER.jobs.add_client_figures(job_id, 1, client, {**figures, "personalized_loss": 0.6, "examples": 64})
    SCHEDULER.store.put(Keys().model_archive(job_id, "client-2"), archive)
    return job_id


def test_a_job_with_rounds_validates_against_jobview() -> None:
    job_id = _committed_job()
    job = _call("GET", "/v1/jobs/{job_id}", path_parameters={"job_id": job_id}).json()
    assert [entry["round"] for entry in job["metrics"]] == [0, 1]
    assert "train_loss" not in job["metrics"][0]  # absent, not null
    assert job["metrics"][1]["loss"] is None  # not a finite number: null, as documented
    assert job["metrics"][1]["per_client"]["2"]["personalized_accuracy"] == 0.75
    assert job["id"] in [listed["id"] for listed in _call("GET", "/v1/jobs").json()]


def test_a_jobs_events_validate() -> None:
    job_id = _committed_job()
    SCHEDULER.handle_event(encode(ClientFailed(job_id=job_id, round=1, client=3, reason="no field 'text'")))
    events = _call("GET", "/v1/jobs/{job_id}/events", path_parameters={"job_id": job_id}).json()
    assert [event["kind"] for event in events] == ["state", "client-failed"]
    assert events[0]["state"] == "queued" and events[1]["client"] == 3
    assert events[1]["message"] == "client 3 failed in round 1: no field 'text'"
    missing = _call("GET", "/v1/jobs/{job_id}/events", path_parameters={"job_id": "no-such-job-0"})
    assert missing.status_code == 404


def test_published_models_validate() -> None:
    job_id = _committed_job()
    response = _call("GET", "/v1/jobs/{job_id}/models/global", path_parameters={"job_id": job_id})
    assert response.status_code == 200 and response.headers["content-type"] == ["application/gzip"]
    path = "/v1/jobs/{job_id}/models/clients/{client}"
    assert _call("GET", path, path_parameters={"job_id": job_id, "client": 2}).status_code == 200
    assert _call("GET", path, path_parameters={"job_id": job_id, "client": 1}).status_code == 404  # not yet
    assert _call("GET", path, path_parameters={"job_id": job_id, "client": 4}).status_code == 404  # out of range


def test_cancel_validates_and_cancelling_again_is_a_documented_409() -> None:
    job_id = _committed_job()
    cancelled = _call("DELETE", "/v1/jobs/{job_id}", path_parameters={"job_id": job_id})
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = _call("DELETE", "/v1/jobs/{job_id}", path_parameters={"job_id": job_id})
    assert again.status_code == 409


def test_a_body_over_the_limit_is_a_documented_413() -> None:
    response = _call("POST", "/v1/jobs", body={"name": "x" * (1024 * 1024)})
    assert response.status_code == 413


def test_an_unreadable_body_is_a_documented_400() -> None:
    response = httpx.post(
        f"{BASE_URL}/v1/jobs", content=b"\xff\n\xff", headers={**AUTH, "content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "400" in OPENAPI["paths"]["/v1/jobs"]["post"]["responses"]
    SCHEMA["/v1/jobs"]["POST"].validate_response(response)


# -- what the document says ----------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"].rsplit("/", 1)[-1]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _reachable(root: str) -> dict[str, dict[str, Any]]:
    components: dict[str, dict[str, Any]] = OPENAPI["components"]["schemas"]
    seen: dict[str, dict[str, Any]] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen[name] = components[name]
            todo.extend(_refs(components[name]))
    return seen


@pytest.mark.parametrize(
    "root",
    [
        *("JobSpec", "JobView", "JobCreated", "ErrorBody", "ValidationErrors", "Readiness", "Purged"),
        *("AdaptRequest", "AdaptationView", "JobEvent"),
    ],
)
def test_every_field_has_a_description(root: str) -> None:
    reachable = _reachable(root)
    if root == "JobSpec":
        assert {"DevicesSpec", "DeviceProfile", "DevicePopulation", "ForwardSpec", "PersonalizationSpec"} <= set(
            reachable
        )
    undescribed = [
        f"{name}.{field}"
        for name, component in reachable.items()
        for field, prop in component.get("properties", {}).items()
        if not str(prop.get("description", "")).strip()
    ]
    assert undescribed == []


ERRORS = {
    ("post", "/v1/jobs"): {"400", "401", "413", "422", "429"},
    ("get", "/v1/jobs"): {"401"},
    ("get", "/v1/jobs/{job_id}"): {"401", "404"},
    ("get", "/v1/jobs/{job_id}/events"): {"401", "404"},
    ("delete", "/v1/jobs/{job_id}"): {"401", "404", "409"},
    ("get", "/v1/jobs/{job_id}/models/global"): {"401", "404"},
    ("get", "/v1/jobs/{job_id}/models/clients/{client}"): {"401", "404", "422"},
    ("post", "/v1/jobs/{job_id}/adapt"): {"400", "401", "404", "409", "413", "422"},
    ("get", "/v1/jobs/{job_id}/adaptations/{adaptation_id}/model"): {"401", "404", "422"},
    ("get", "/readyz"): {"503"},
}


@pytest.mark.parametrize(("method", "path"), list(ERRORS))
def test_error_responses_are_documented_where_they_can_occur(method: str, path: str) -> None:
    responses = OPENAPI["paths"][path][method]["responses"]
    assert ERRORS[method, path] <= set(responses)
    for code in ERRORS[method, path]:
        assert responses[code]["description"] and _refs(responses[code]["content"]), code
    success = next(code for code in responses if code.startswith("2"))
    assert responses[success]["content"], "a 2xx response documents its body"


def test_every_v1_operation_declares_the_bearer_token() -> None:
    for path, operations in OPENAPI["paths"].items():
        for operation in operations.values():
            assert ("security" in operation) == path.startswith("/v1/"), path
