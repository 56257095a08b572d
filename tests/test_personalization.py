"""Global partial aggregation: personal tensors stay with their client; personalized models publish."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from services.embedded import EmbeddedCluster
from shared import data
from shared.adapters import build_peft_model
from shared.codec import decode_tensors
from shared.evaluation import evaluate, predict
from shared.models import load_base_model, load_tokenizer, load_trainable_state
from shared.personalization import is_personal, personal_names, split_state
from shared.spec import JobSpec
from shared.state.tensors import TensorRepository
from shared.store import Keys
from shared.store.memory import MemoryStore


class RecordingStore(MemoryStore):
    """Remembers every update payload a worker stored: what the aggregator could ever receive."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: dict[str, bytes] = {}

    def put(self, key: str, value: bytes, ttl_s: int | None = None) -> None:
        if ":update:" in key:
            self.updates[key] = bytes(value)
        super().put(key, value, ttl_s)


def trainable_names(spec: JobSpec, cache_dir: Path) -> list[str]:
    model = build_peft_model(spec, cache_dir)
    return [name for name, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize(
    ("preset", "personal_marker", "global_marker"),
    [
        ("pwff", ".self.", ".output.dense."),  # attention (query/value) LoRA personal, the FFN adapter shared
        ("fedsa", "lora_B", "lora_A"),
        ("head", "modules_to_save", "lora_"),
    ],
)
def test_presets_split_the_trainable_tensors(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path, preset: str, personal_marker: str, global_marker: str
) -> None:
    spec = tiny_spec(personalization={"preset": preset})
    names = trainable_names(spec, cache_dir)
    personal = personal_names(spec, names)
    assert personal and len(personal) < len(names)
    assert all(personal_marker in name for name in personal)
    assert any(global_marker in name for name in set(names) - personal)


def test_pwff_preset_adds_a_shared_adapter_on_the_feed_forward_output(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path
) -> None:
    names = trainable_names(tiny_spec(personalization={"preset": "pwff", "adapter_r": 2}), cache_dir)
    adapters = [n for n in names if ".output.dense." in n and "attention" not in n]
    assert adapters, "the pwff preset must add the feed-forward adapter"
    assert not any(".attention.output.dense." in n for n in names)
    plain = trainable_names(tiny_spec(), cache_dir)
    assert not any(".output.dense." in n for n in plain)


def test_patterns_add_personal_tensors(tiny_spec: Callable[..., JobSpec]) -> None:
    spec = tiny_spec(personalization={"preset": "none", "personal": ["*layer.1.*"]})
    assert is_personal(spec, "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.default.weight")
    assert not is_personal(spec, "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight")
    shared, personal = split_state(spec, {"a.layer.1.x": torch.zeros(1), "a.layer.0.x": torch.zeros(1)})
    assert list(personal) == ["a.layer.1.x"] and list(shared) == ["a.layer.0.x"]


@pytest.fixture(scope="module")
def pwff_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, dict, RecordingStore, Path]:
    from tests.conftest import TINY

    cache = tmp_path_factory.mktemp("cache")
    spec = JobSpec.model_validate(
        {
            **TINY,
            "num_clients": 4,
            "clients_per_round": 2,
            "rounds": 3,
            "personalization": {"preset": "pwff", "eval_examples_per_client": 16},
        }
    )
    store = RecordingStore()
    cluster = EmbeddedCluster(cache, workers=2, store=store)
    with cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id)
    assert job["state"] == "succeeded", job
    return spec, job, store, cache


def test_personal_tensors_never_reach_the_aggregator(pwff_run: tuple[JobSpec, dict, RecordingStore, Path]) -> None:
    spec, _, store, _ = pwff_run
    assert store.updates, "no update was stored"
    for key, blob in store.updates.items():
        names = set(decode_tensors(blob))
        assert names and not personal_names(spec, names), f"{key} carries personal tensors"


def test_clients_keep_different_personal_tensors(pwff_run: tuple[JobSpec, dict, RecordingStore, Path]) -> None:
    spec, job, store, _ = pwff_run
    keys = Keys()
    states = {}
    for client in range(spec.num_clients):
        found = TensorRepository(store, keys).latest_personal(job["id"], client, before=(spec.rounds + 1, 0))
        if found is not None:
            states[client] = decode_tensors(found[1])
    assert len(states) >= 2, "at least two clients trained"
    first, second = list(states.values())[:2]
    assert set(first) == set(second) and personal_names(spec, first) == set(first)
    assert any(not torch.equal(first[name], second[name]) for name in first)


def test_every_client_reports_global_and_personalized_accuracy(
    pwff_run: tuple[JobSpec, dict, RecordingStore, Path],
) -> None:
    spec, job, _, _ = pwff_run
    last = job["metrics"][-1]
    assert sorted(last["per_client"]) == list(range(spec.num_clients))
    for figures in last["per_client"].values():
        assert 0 <= figures["global_accuracy"] <= 1 and 0 <= figures["personalized_accuracy"] <= 1
    assert "client_mean_personalized_accuracy" in last


def test_published_personalized_folder_loads_with_peft_and_predicts_like_the_system(
    pwff_run: tuple[JobSpec, dict, RecordingStore, Path], tmp_path: Path
) -> None:
    spec, job, store, cache = pwff_run
    keys = Keys()
    client = max(range(spec.num_clients), key=lambda c: len(store.set_members(keys.personal_rounds(job["id"], c))))
    archive = store.get(keys.model_archive(job["id"], f"client-{client}"))
    assert archive is not None
    folder = tmp_path / "client"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")
    base = load_base_model(spec.model, data.info(spec.dataset).num_labels, cache)
    loaded = PeftModel.from_pretrained(base, folder)
    tokenizer = load_tokenizer(spec.model, cache)
    examples = data.client_test_examples(spec, client, spec.personalization.eval_examples_per_client)

    # The system's own personalized model: the final global state plus this client's personal part.
    system = build_peft_model(spec, cache)
    global_blob = store.get(keys.global_state(job["id"], spec.rounds))
    assert global_blob is not None
    found = TensorRepository(store, keys).latest_personal(job["id"], client, before=(spec.rounds + 1, 0))
    assert found is not None
    personal_blob = found[1]
    load_trainable_state(system, {**decode_tensors(global_blob), **decode_tensors(personal_blob)})

    assert predict(loaded, tokenizer, examples, spec.max_length) == predict(
        system, tokenizer, examples, spec.max_length
    )
    reported = job["metrics"][-1]["per_client"][client]["personalized_accuracy"]
    assert evaluate(loaded, tokenizer, examples, "classification", spec.max_length)["accuracy"] == reported
