"""Cold start: a client held out from training gets the global part plus a few local steps on its own
data, fine-tuning only its personal part, and does better than the global model alone.

One tiny-bert job per preset, embedded; the newcomers' data comes from the held-out test split.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from typer.testing import CliRunner

from services.cli import app as cli
from services.embedded import EmbeddedCluster
from services.results import write_results
from services.scheduler.api import create_app
from services.scheduler.core import Scheduler
from shared import coldstart, data
from shared.adapters import build_model
from shared.bus.memory import MemoryBus
from shared.catalog import dataset_info
from shared.codec import decode_tensors
from shared.models import extract_archive, load_base_model, load_tokenizer
from shared.personalization import is_personal
from shared.spec import JobSpec
from shared.store import Keys
from shared.store.memory import MemoryStore

TOKEN = "cold-start-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Per preset, the newcomer's learning rate: pwff fine-tunes only an attention LoRA of a random tiny model.
LR = {"pwff": 0.05, "head": 0.05, "none": 0.05}


@dataclass
class Trained:
    spec: JobSpec
    job_id: str
    job: dict[str, object]
    store: MemoryStore
    global_state: dict[str, torch.Tensor]
    results: Path


def _train(spec: JobSpec, cache_dir: Path, out: Path) -> Trained:
    with EmbeddedCluster(cache_dir) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, poll_s=0.05)
        write_results(
            out,
            job,
            cluster.scheduler.model_archive(job_id),
            lambda client: cluster.scheduler.model_archive(job_id, client),
            range(spec.num_clients),
        )
    assert job["state"] == "succeeded", job.get("error")
    blob = cluster.store.get(Keys().global_state(job_id, spec.rounds))
    assert blob is not None
    return Trained(spec, job_id, job, cluster.store, decode_tensors(blob), out)


@pytest.fixture(scope="module")
def trained(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Trained]:
    """`trained(preset)`: a label-skewed tiny-bert job with that preset, trained once per module."""
    jobs: dict[str, Trained] = {}

    def get(preset: str) -> Trained:
        if preset not in jobs:
            spec = tiny_spec(
                name=f"cold-{preset}",
                partition={"kind": "dirichlet", "alpha": 0.1},
                num_clients=4,
                clients_per_round=4,
                rounds=3,
                local_steps=5,
                batch_size=8,
                optimizer={"lr": 0.01},
                personalization={"preset": preset, "eval_examples_per_client": 16},
            )
            jobs[preset] = _train(spec, cache_dir, tmp_path_factory.mktemp(f"results-{preset}"))
        return jobs[preset]

    return get


# -- a newcomer's data -------------------------------------------------------------------------------


def test_a_newcomer_has_held_out_examples_of_its_own(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = tiny_spec(partition={"kind": "dirichlet", "alpha": 0.1})
    train, test = coldstart.newcomer_examples(spec, 0, 40, 30)
    assert (len(train), len(test)) == (40, 30)
    held_out = set(data.load(spec.dataset, "test"))
    assert set(train) <= held_out and set(test) <= held_out  # nothing any client trains on
    assert not set(train) & set(test)
    # Label skew like the job's clients: a few labels dominate, train and test alike.
    counts = np.bincount([e.label for e in train], minlength=5)
    assert counts.max() >= len(train) / 2
    assert coldstart.newcomer_examples(spec, 0, 40, 30) == (train, test)
    assert coldstart.newcomer_examples(spec, 1, 40, 30) != (train, test)


# -- the start from the clients' personal parts ------------------------------------------------------------


def test_merged_personal_lora_is_the_best_rank_r_pair_for_the_mean_update(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path
) -> None:
    spec = tiny_spec(personalization={"preset": "fedsa"}, lora={"r": 2, "alpha": 4})
    names = {n: p.shape for n, p in build_model(spec, cache_dir).named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(0)
    clients = [{n: torch.randn(shape, generator=generator) for n, shape in names.items()} for _ in range(3)]
    global_state = {n: torch.zeros(shape) for n, shape in names.items()}
    merged = coldstart.mean_personal(spec, global_state, clients)
    assert set(merged) == {n for n in names if is_personal(spec, n)}  # only lora_B is personal in FedSA
    for name in merged:  # lora_A is global: the personal B alone is averaged
        assert torch.allclose(merged[name], torch.stack([c[name] for c in clients]).mean(0), atol=1e-6)
    both = tiny_spec(personalization={"preset": "pwff"}, lora={"r": 2, "alpha": 4})
    names = {n: p.shape for n, p in build_model(both, cache_dir).named_parameters() if p.requires_grad}
    clients = [{n: torch.randn(shape, generator=generator) for n, shape in names.items()} for _ in range(3)]
    global_state = {n: torch.zeros(shape) for n, shape in names.items()}
    merged = coldstart.mean_personal(both, global_state, clients)
    a_name = next(n for n in merged if "lora_A" in n)
    b_name = a_name.replace("lora_A", "lora_B")
    mean = torch.stack([c[b_name].double() @ c[a_name].double() for c in clients]).mean(0)
    u, s, vh = torch.linalg.svd(mean)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.allclose((merged[b_name] @ merged[a_name]).double(), best, atol=1e-5)
    # clients-basis: the merged A, with B zero (a no-op LoRA that moves, once trained, where the clients' did).
    basis = coldstart.start_state(both, global_state, coldstart.Start.CLIENTS_BASIS, clients)
    assert torch.equal(basis[a_name], merged[a_name]) and not basis[b_name].any()
    assert coldstart.default_start(both, global_state, clients_published=True) is coldstart.Start.CLIENTS_BASIS
    assert coldstart.default_start(both, global_state, clients_published=False) is coldstart.Start.GLOBAL
    assert coldstart.default_start(spec, global_state, clients_published=True) is coldstart.Start.GLOBAL  # FedSA
    with pytest.raises(coldstart.ColdStartError, match="nothing personal"):
        coldstart.start_state(tiny_spec(), global_state, coldstart.Start.CLIENTS_MEAN, clients)


# -- local steps on the personal part ------------------------------------------------------------------


def test_adapting_moves_only_the_personal_part(trained: Callable[[str], Trained], cache_dir: Path) -> None:
    job = trained("pwff")
    spec = job.spec
    model = build_model(spec, cache_dir)
    train, _ = coldstart.newcomer_examples(spec, 0, 32, 16)
    result = coldstart.adapt(model, load_tokenizer(spec.model, cache_dir), spec, job.global_state, train, 5, lr=0.05)
    assert result.trained == sorted(n for n in job.global_state if is_personal(spec, n))
    for name, value in result.state.items():
        if is_personal(spec, name):
            continue
        assert torch.equal(value, job.global_state[name]), name
    assert any(not torch.equal(result.state[n], job.global_state[n]) for n in result.trained)
    assert all(p.requires_grad for n, p in model.named_parameters() if n in job.global_state)


@pytest.mark.parametrize("preset", ["pwff", "head", "none"])
def test_cold_start_improves_a_held_out_client_over_the_global_model(
    trained: Callable[[str], Trained], cache_dir: Path, preset: str
) -> None:
    job = trained(preset)
    spec = job.spec
    model = build_model(spec, cache_dir)
    tokenizer = load_tokenizer(spec.model, cache_dir)
    before, after = [], []
    for newcomer in range(4):
        train, test = coldstart.newcomer_examples(spec, newcomer, 32, 32)
        result = coldstart.adapt(
            model, tokenizer, spec, job.global_state, train, 20, lr=LR[preset], eval_examples=test, checkpoints=(0,)
        )
        assert [point.steps for point in result.curve] == [0, 20]
        before.append(result.curve[0].accuracy)
        after.append(result.curve[-1].accuracy)
    assert np.mean(after) >= np.mean(before) + 0.2, (before, after)


# -- published folders, the CLI and the API ---------------------------------------------------------------


def test_the_published_global_folder_reads_back_the_committed_state(
    trained: Callable[[str], Trained], cache_dir: Path
) -> None:
    job = trained("pwff")
    state = coldstart.state_from_folder(build_model(job.spec, cache_dir), job.results / "global")
    assert set(state) == set(job.global_state)
    assert all(torch.equal(state[n], job.global_state[n]) for n in state)


def test_read_examples_takes_json_lines_and_csv_with_names_or_indices(
    tiny_spec: Callable[..., JobSpec], tmp_path: Path
) -> None:
    spec = tiny_spec()
    lines = tmp_path / "data.jsonl"
    lines.write_text('{"text": "shares fell", "label": "business"}\n\n{"text": "a goal", "label": 3}\n')
    table = tmp_path / "data.csv"
    table.write_text('text,label\n"shares, fell",0\na goal,sport\n')
    assert coldstart.read_examples(lines, spec) == [data.Example("shares fell", 0), data.Example("a goal", 3)]
    with pytest.raises(coldstart.ColdStartError, match=r"data.csv:3: unknown label 'sport'; known: business"):
        coldstart.read_examples(table, spec)
    table.write_text('text,label\n"shares, fell",0\na goal,7\n')
    with pytest.raises(coldstart.ColdStartError, match=r"class index 0\.\.4"):
        coldstart.read_examples(table, spec)
    lines.write_text("not json\n")
    with pytest.raises(coldstart.ColdStartError, match=r"data.jsonl:1: not JSON"):
        coldstart.read_examples(lines, spec)


def _write_examples(path: Path, examples: list[data.Example]) -> Path:
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
    return path


def test_pwff_adapt_writes_the_newcomers_peft_folder(
    trained: Callable[[str], Trained], cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = trained("pwff")
    monkeypatch.setenv("PWFF_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("COLUMNS", "200")
    train, test = coldstart.newcomer_examples(job.spec, 0, 32, 16)
    out = tmp_path / "newcomer"
    args = ["adapt", str(job.results), "--data", str(_write_examples(tmp_path / "train.jsonl", train))]
    args += ["--eval", str(_write_examples(tmp_path / "test.jsonl", test)), "--steps", "5", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "5 steps from the clients-basis start" in result.output and "held-out accuracy" in result.output
    base = load_base_model(job.spec.model, 5, cache_dir)
    loaded = PeftModel.from_pretrained(base, str(out))
    state = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n or "modules_to_save" in n}
    shared = [n for n in job.global_state if not is_personal(job.spec, n)]
    assert shared and all(torch.equal(state[n], job.global_state[n]) for n in shared if n in state)
    # Bad input is one line and exit code 2.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "weather"}\n')
    result = CliRunner().invoke(cli, ["adapt", str(job.results), "--data", str(bad), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown label 'weather'" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_api_adapts_a_newcomer_and_serves_its_model(trained: Callable[[str], Trained], cache_dir: Path) -> None:
    job = trained("pwff")
    scheduler = Scheduler(MemoryBus(), job.store)
    client = TestClient(create_app(scheduler, TOKEN, cache_dir=cache_dir))
    train, test = coldstart.newcomer_examples(job.spec, 1, 32, 16)

    def body(**extra: object) -> dict[str, object]:
        return {
            "examples": [{"text": e.text, "label": e.label} for e in train],
            "eval_examples": [
                {"text": e.text, "label": dataset_info(job.spec.dataset).label_names[e.label]} for e in test
            ],
            "steps": 5,
            **extra,
        }

    response = client.post(f"/v1/jobs/{job.job_id}/adapt", json=body(start="global"), headers=AUTH)
    assert response.status_code == 201, response.text
    view = response.json()
    assert view["start"] == "global" and view["train"] == "personal" and view["round"] == job.spec.rounds
    assert view["trained_tensors"] == len([n for n in job.global_state if is_personal(job.spec, n)])
    assert view["before"]["accuracy"] is not None and view["after"]["accuracy"] is not None
    archive = client.get(view["model"], headers=AUTH)
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/gzip"
    with tempfile.TemporaryDirectory() as tmp:
        folder = extract_archive(archive.content, Path(tmp))
        state = coldstart.state_from_folder(build_model(job.spec, cache_dir), folder)
    personal = [n for n in state if is_personal(job.spec, n)]
    assert any(not torch.equal(state[n], job.global_state[n]) for n in personal)
    assert all(torch.equal(state[n], job.global_state[n]) for n in state if n not in personal)
    # The default start, once the job has published its clients' models: their merged LoRA A, B zero,
    # so before any step the newcomer's model is the global part alone.
    basis = client.post(f"/v1/jobs/{job.job_id}/adapt", json=body(steps=0), headers=AUTH).json()
    assert basis["start"] == "clients-basis" and basis["after"] == view["before"]
    merged = client.post(f"/v1/jobs/{job.job_id}/adapt", json=body(steps=0, start="clients-mean"), headers=AUTH)
    assert merged.status_code == 201 and merged.json()["start"] == "clients-mean"
    # Documented errors.
    assert client.post("/v1/jobs/nope/adapt", json=body(), headers=AUTH).status_code == 404
    wrong = client.post(f"/v1/jobs/{job.job_id}/adapt", json={"examples": [{"text": "x", "label": 9}]}, headers=AUTH)
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["body", "examples"]
    queued = scheduler.submit(job.spec)  # no aggregator here: it never commits a state
    assert client.post(f"/v1/jobs/{queued}/adapt", json=body(), headers=AUTH).status_code == 409
    assert client.get(f"/v1/jobs/{job.job_id}/adaptations/0123456789ab/model", headers=AUTH).status_code == 404
    fedavg = trained("none")
    scheduler = Scheduler(MemoryBus(), fedavg.store)
    client = TestClient(create_app(scheduler, TOKEN, cache_dir=cache_dir))
    refused = client.post(f"/v1/jobs/{fedavg.job_id}/adapt", json=body(train="personal"), headers=AUTH)
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "train"]
    everything = client.post(f"/v1/jobs/{fedavg.job_id}/adapt", json=body(), headers=AUTH).json()
    assert everything["train"] == "all" and everything["start"] == "global"


def test_pwff_adapt_reads_a_job_over_the_api(
    trained: Callable[[str], Trained], cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services import cli as cli_module

    job = trained("pwff")
    app_ = create_app(Scheduler(MemoryBus(), job.store), TOKEN, cache_dir=cache_dir)
    from services.client import Client

    monkeypatch.setattr(cli_module, "Client", lambda api, token: Client(token=token, http=TestClient(app_)))
    monkeypatch.setenv("PWFF_API_TOKEN", TOKEN)
    monkeypatch.setenv("PWFF_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("COLUMNS", "200")
    train, _ = coldstart.newcomer_examples(job.spec, 2, 32, 16)
    out = tmp_path / "over-the-api"
    args = ["adapt", job.job_id, "--data", str(_write_examples(tmp_path / "train.jsonl", train)), "-o", str(out)]
    result = CliRunner().invoke(cli, [*args, "--steps", "3", "--start", "global"])
    assert result.exit_code == 0, result.output
    assert "3 steps from the global start" in result.output
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    result = CliRunner().invoke(cli, [*args, "--start", "somewhere"])
    assert (
        result.exit_code == 2 and "--start global, clients-mean or clients-basis (got None, somewhere)" in result.output
    )
