"""Bring your own model and data: a local Hugging Face folder and local JSONL/CSV/Parquet/Arrow records."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from services.embedded import EmbeddedCluster
from shared import data
from shared.catalog import LocalData, ModelFolderError, model_info
from shared.models import minilm_dir
from shared.spec import JobSpec, SpecError, parse_spec

TOPICS = ("weather", "sport", "money")
WORDS = {
    "weather": "rain sun cloud storm wind snow forecast",
    "sport": "goal match team score player league cup",
    "money": "bank price market stock trade profit loan",
}


def records(count: int = 90) -> list[dict[str, Any]]:
    """Short texts whose words give away their topic, with a site column for natural partitions."""
    rows = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        words = WORDS[topic].split()
        text = " ".join(words[(i + k) % len(words)] for k in range(5)) + f" item {i}"
        rows.append({"body": text, "topic": topic, "site": f"site-{i % 3}"})
    return rows


def save_tiny_classifier(folder: Path) -> Path:
    """A tiny BERT sequence classifier saved as a user would: save_pretrained (safetensors) + tokenizer."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("byo") / "my-bert")


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("byo-data") / "notes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
    return path


def byo_spec(model_dir: Path, source: dict[str, Any], **overrides: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "byo",
            "model": str(model_dir),
            "dataset": {"text_field": "body", "label_field": "topic", **source},
            "num_clients": 3,
            "clients_per_round": 3,
            "rounds": 2,
            "local_steps": 2,
            "batch_size": 4,
            "max_length": 24,
            "eval_max_examples": 16,
            "partition": {"kind": "iid", "min_examples": 4},
            "lora": {"r": 2, "alpha": 4},
            **overrides,
        }
    )


def test_a_local_folder_is_a_catalog_entry(model_dir: Path) -> None:
    info = model_info(str(model_dir))
    assert info.task == "classification"
    assert info.lora_targets == ("query", "value")  # peft's default for bert
    assert info.num_params == sum(
        p.numel() for p in BertForSequenceClassification.from_pretrained(model_dir).parameters()
    )


def test_folders_pwff_will_not_load_are_refused_in_plain_words(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ModelFolderError, match="no such folder"):
        model_info(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="not a Hugging Face model folder"):
        model_info(str(tmp_path / "empty"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((model_dir / "config.json").read_text())
    torch.save(BertForSequenceClassification.from_pretrained(model_dir).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="pickle weights"):
        model_info(str(pickled))
    custom = tmp_path / "custom"
    custom.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ModelFolderError, match="custom code"):
        model_info(str(custom))
    with pytest.raises(SpecError, match=r"model: .*no such folder"):
        parse_spec({"model": str(tmp_path / "missing")})


def test_every_format_reads_the_same_examples(tmp_path: Path, jsonl: Path) -> None:
    rows = records()
    with (tmp_path / "notes.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "notes.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "notes-arrow"))
    fields = {"text_field": "body", "label_field": "topic"}
    expected = data.load(LocalData(path=str(jsonl), **fields), "train")
    assert len(expected) + len(data.load(LocalData(path=str(jsonl), **fields), "test")) == len(rows)
    for name in ("notes.csv", "notes.parquet", "notes-arrow"):
        assert data.load(LocalData(path=str(tmp_path / name), **fields), "train") == expected, name
    # Labels are inferred (sorted) when the spec names none.
    assert data.info(LocalData(path=str(jsonl), **fields)).label_names == ("money", "sport", "weather")
    whole = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(whole))
    with pytest.raises(data.DataMismatch, match="several splits"):
        data.load(LocalData(path=str(whole), **fields), "train")


def test_each_client_holds_out_part_of_its_own_shard(model_dir: Path, jsonl: Path) -> None:
    spec = data.check_local_data(byo_spec(model_dir, {"path": str(jsonl)}))
    assert isinstance(spec.dataset, LocalData) and spec.dataset.labels == ["money", "sport", "weather"]
    seen: set[str] = set()
    for client in range(spec.num_clients):
        train = {e.text for e in data.client_examples(spec, client)}
        test = {e.text for e in data.client_test_examples(spec, client)}
        assert train and test and not train & test
        assert not (train | test) & seen  # shards are disjoint: the held-out part is the client's own
        seen |= train | test
    assert len(seen) == len(records())


def test_natural_partition_follows_the_group_column(model_dir: Path, jsonl: Path) -> None:
    spec = data.check_local_data(
        byo_spec(model_dir, {"path": str(jsonl), "group_field": "site"}, partition={"kind": "natural"})
    )
    sites = [{int(e.text.rsplit(" ", 1)[1]) % 3 for e in data.client_examples(spec, c)} for c in range(3)]
    assert sorted(map(sorted, sites)) == [[0], [1], [2]]


def test_data_that_does_not_fit_is_a_clear_error(tmp_path: Path, model_dir: Path, jsonl: Path) -> None:
    with pytest.raises(data.DataMismatch, match="record 1 has no field 'text'"):
        data.check_local_data(byo_spec(model_dir, {"path": str(jsonl), "text_field": "text"}))
    with pytest.raises(data.DataMismatch, match="label 'money' is not one of the classes"):
        data.check_local_data(byo_spec(model_dir, {"path": str(jsonl), "labels": ["sport", "weather"]}))
    with pytest.raises(SpecError, match=r"dataset.*labels"):
        parse_spec({"dataset": {"path": str(jsonl), "label_field": "topic", "labels": ["one"]}})


def test_a_byo_job_trains_embedded(model_dir: Path, jsonl: Path, cache_dir: Path) -> None:
    spec = byo_spec(model_dir, {"path": str(jsonl)})
    with EmbeddedCluster(cache_dir, workers=1) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, poll_s=0.05)
        archive = cluster.scheduler.model_archive(job_id)
    assert job["state"] == "succeeded", job.get("error")
    assert [m["round"] for m in job["metrics"]] == [0, 1, 2] and archive is not None
    assert job["spec"]["dataset"]["labels"] == ["money", "sport", "weather"]  # pinned at submission


def test_a_worker_whose_data_does_not_match_fails_its_task_and_the_round_goes_on(
    tmp_path: Path, model_dir: Path, jsonl: Path, cache_dir: Path, tiny_spec: Callable[..., JobSpec]
) -> None:
    spec = data.check_local_data(byo_spec(model_dir, {"path": str(jsonl)}, rounds=1, quorum=0.3))
    # The shared file changes under the job: a worker now finds a class the job does not know.
    rows = [{**r, "topic": "weather" if r["topic"] != "money" else "gossip"} for r in records()]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data._splits.cache_clear()
    data._partition_cached.cache_clear()
    try:
        with pytest.raises(data.DataMismatch, match="label 'gossip' is not one of the classes"):
            data.client_examples(spec, 0)
    finally:
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
        data._splits.cache_clear()
        data._partition_cached.cache_clear()


def test_the_readme_example_validates_with_a_model_folder(model_dir: Path) -> None:
    """examples/byo/spec.yaml as the README runs it, with this test's model folder for ./my-model."""
    from shared.spec import load_spec_file

    repo = Path(__file__).resolve().parents[1]
    example = repo / "examples" / "byo" / "spec.yaml"
    spec = load_spec_file(str(example), [f"model={model_dir}", f"dataset.path={repo}/examples/byo/tickets.jsonl"])
    spec = data.check_local_data(spec)
    assert spec.name == "byo" and isinstance(spec.dataset, LocalData)
    assert spec.dataset.labels == ["account", "billing", "shipping"]
    # The natural partition gives each client one site.
    sites = [{e.group for e in data.client_examples(spec, c)} for c in range(spec.num_clients)]
    assert sorted(len(s) for s in sites) == [1, 1, 1] and len(set().union(*sites)) == 3


def test_a_causal_lm_folder_trains_on_a_text_file(tmp_path: Path, cache_dir: Path) -> None:
    """A tiny Llama saved to disk, on text-only records (no label field): a causal-LM job, natural by site."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path / "my-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert model_info(str(folder)).task == "causal-lm"
    assert model_info(str(folder)).lora_targets == ("q_proj", "v_proj")
    parquet = tmp_path / "notes.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records()), parquet)
    spec = JobSpec.model_validate(
        {
            "name": "byo-lm",
            "model": str(folder),
            "dataset": {"path": str(parquet), "text_field": "body", "group_field": "site"},
            "partition": {"kind": "natural", "min_examples": 4},
            "num_clients": 3,
            "clients_per_round": 2,
            "rounds": 1,
            "local_steps": 2,
            "batch_size": 4,
            "max_length": 16,
            "eval_max_examples": 8,
            "lora": {"r": 2, "alpha": 4},
        }
    )
    with EmbeddedCluster(cache_dir, workers=1) as cluster:
        job = cluster.wait(cluster.scheduler.submit(spec), poll_s=0.05)
    assert job["state"] == "succeeded", job.get("error")
    assert job["metrics"][-1]["loss"] is not None


def test_a_worker_without_the_model_folder_fails_the_task_with_the_reason(
    tmp_path: Path, jsonl: Path, cache_dir: Path
) -> None:
    """A worker that does not mount the job's model folder: the task fails, and the scheduler hears why."""
    import shutil

    from services.worker.worker import Worker
    from shared.bus import Queues
    from shared.bus.memory import MemoryBus
    from shared.messages import ClientFailed, InvalidMessage, TrainTask, decode_scheduler, encode
    from shared.state import JobMeta, Repositories
    from shared.store.memory import MemoryStore
    from tests.harness import drain

    folder = save_tiny_classifier(tmp_path / "elsewhere")
    spec = data.check_local_data(byo_spec(folder, {"path": str(jsonl)}))
    bus, store = MemoryBus(), MemoryStore()
    Repositories(store, "pwff").jobs.create(JobMeta(id="byo-job-1", spec=spec, created_at=0.0, updated_at=0.0))
    shutil.rmtree(folder)  # this worker's machine does not have it
    worker = Worker(bus, store, cache_dir=cache_dir)
    with pytest.raises(InvalidMessage, match="no such folder"):
        worker.handle(encode(TrainTask(job_id="byo-job-1", round=1, client=2, local_steps=1)))
    [event] = [decode_scheduler(body) for body in drain(bus, Queues().events)]
    assert isinstance(event, ClientFailed) and event.client == 2
    assert event.reason == f"the job's spec does not load here: model: model '{folder}': no such folder"


def test_bound_clients_read_their_own_files_with_the_jobs_fields(
    model_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """A bound job over a BYO model and a local source: each client's worker reads its own file with the
    spec's fields; dataset.path is the platform's held-out file the aggregator evaluates the global model on."""
    from tests.bound import LABELS, bound_spec, enroll_clients, write_client_data
    from tests.test_bound import Federation

    clients_file, clients = enroll_clients(tmp_path)
    held_out = tmp_path / "platform-eval.jsonl"
    write_client_data(held_out, "EVAL")
    source = {"path": str(held_out), "text_field": "text", "label_field": "label"}
    spec = bound_spec(model=str(model_dir), dataset=source)
    with pytest.raises(data.DataMismatch, match=r"list the classes in dataset\.labels"):
        data.check_local_data(parse_spec(spec))
    spec["dataset"] = {**source, "labels": list(LABELS)}
    with Federation(cache_dir, clients_file, clients) as federation:
        job = federation.run(spec)
    assert job["state"] == "succeeded", job.get("error")
    assert [m["clients"] for m in job["metrics"][1:]] == [[0, 1, 2], [0, 1, 2]]
    assert {c: f["examples"] for c, f in job["metrics"][-1]["per_client"].items()} == {0: 5.0, 1: 5.0, 2: 5.0}
