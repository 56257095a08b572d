"""The job spec: validation at the edge, CLI overrides and spec files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.spec import JobSpec, SpecError, apply_overrides, load_spec_file, parse_spec

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_a_valid_job() -> None:
    spec = parse_spec({})
    assert spec == JobSpec()
    assert spec.model == "minilm-l6" and spec.dataset == "bbc-news"
    assert spec.clients_per_round <= spec.num_clients


def test_unknown_top_level_key_is_rejected_and_named() -> None:
    with pytest.raises(SpecError, match=r"roundz: unknown field \(did you mean 'rounds'\?\)$"):
        parse_spec({"roundz": 3})


def test_errors_are_in_plain_words_with_a_suggestion_for_near_misses() -> None:
    with pytest.raises(SpecError, match=r"^clients_per_round \(3\) exceeds num_clients \(2\)$"):
        parse_spec({"num_clients": 2, "clients_per_round": 3})  # no pydantic "Value error," prefix
    with pytest.raises(SpecError, match=r"^dataset\.lable_field: unknown field \(did you mean 'label_field'\?\)$"):
        parse_spec({"dataset": {"path": "/data/x.jsonl", "lable_field": "y"}})
    with pytest.raises(SpecError, match=r"^fwd\.zebra: unknown field$"):  # nothing close: no guess
        parse_spec({"fwd": {"zebra": 1}})


def test_unknown_nested_key_is_rejected_with_its_dotted_path() -> None:
    with pytest.raises(SpecError, match=r"optimizer\.learning_rate"):
        parse_spec({"optimizer": {"learning_rate": 0.1}})


def test_out_of_range_value_names_the_field() -> None:
    with pytest.raises(SpecError, match=r"^num_clients: "):
        parse_spec({"num_clients": -1})


def test_non_mapping_spec_is_rejected() -> None:
    with pytest.raises(SpecError, match="expected a mapping, got list"):
        parse_spec([1, 2])


def test_more_clients_per_round_than_clients_is_rejected() -> None:
    with pytest.raises(SpecError, match=r"clients_per_round \(5\) exceeds num_clients \(4\)"):
        parse_spec({"num_clients": 4, "clients_per_round": 5})
    assert parse_spec({"num_clients": 4, "clients_per_round": 4}).clients_per_round == 4


@pytest.mark.parametrize(
    ("model", "dataset"),
    [
        ("tiny-bert", "jane-austen"),
        ("minilm-l6", "jane-austen"),
        ("tiny-llama", "bbc-news"),
        ("smollm2-135m", "tweets-sentiment"),
    ],
)
def test_model_and_dataset_must_agree_on_the_task(model: str, dataset: str) -> None:
    with pytest.raises(SpecError, match=f"model '{model}' is a .* cannot train on dataset '{dataset}'"):
        parse_spec({"model": model, "dataset": dataset})


@pytest.mark.parametrize(
    ("model", "dataset"), [("tiny-bert", "bbc-news"), ("minilm-l6", "tweets-sentiment"), ("tiny-llama", "jane-austen")]
)
def test_matching_model_and_dataset_are_accepted(model: str, dataset: str) -> None:
    spec = parse_spec({"model": model, "dataset": dataset})
    assert (spec.model, spec.dataset) == (model, dataset)


def test_natural_partition_only_for_jane_austen() -> None:
    with pytest.raises(SpecError, match="partition 'natural' needs a data set with natural groups"):
        parse_spec({"partition": {"kind": "natural"}})
    spec = parse_spec({"model": "tiny-llama", "dataset": "jane-austen", "partition": {"kind": "natural"}})
    assert spec.partition.kind == "natural"


def test_spec_is_frozen() -> None:
    spec = JobSpec()
    with pytest.raises(ValueError, match="frozen"):
        spec.rounds = 3  # type: ignore[misc]


def test_overrides_set_nested_and_top_level_keys_with_yaml_types() -> None:
    data = {"rounds": 5, "optimizer": {"name": "sgd", "lr": 0.1}}
    out = apply_overrides(
        data, ["optimizer.lr=0.01", "rounds=3", "lora.train_head=false", "name=run-1", "lora.target_modules=[query]"]
    )
    assert out == {
        "rounds": 3,
        "optimizer": {"name": "sgd", "lr": 0.01},
        "lora": {"train_head": False, "target_modules": ["query"]},
        "name": "run-1",
    }
    assert isinstance(out["rounds"], int) and isinstance(out["optimizer"]["lr"], float)
    # The input mapping (and its nested mappings) are left untouched.
    assert data == {"rounds": 5, "optimizer": {"name": "sgd", "lr": 0.1}}
    spec = parse_spec(out)
    assert spec.optimizer.lr == 0.01 and spec.rounds == 3 and spec.lora.train_head is False


def test_override_with_empty_value_sets_an_empty_string() -> None:
    assert apply_overrides({}, ["name="]) == {"name": ""}


@pytest.mark.parametrize("bad", ["rounds", "=3", ""])
def test_malformed_override_is_rejected(bad: str) -> None:
    with pytest.raises(SpecError, match="expected key=value"):
        apply_overrides({}, [bad])


def test_load_spec_file_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: tiny-bert\nrounds: 2\noptimizer:\n  lr: 0.5\n")
    spec = load_spec_file(str(path), ["optimizer.lr=0.01", "rounds=3"])
    assert spec.model == "tiny-bert" and spec.rounds == 3 and spec.optimizer.lr == 0.01


def test_empty_spec_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_spec_file(str(path)) == JobSpec()


def test_load_spec_file_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"cannot read spec .*nope\.yaml"):
        load_spec_file(str(tmp_path / "nope.yaml"))


def test_load_spec_file_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: [1, 2\n")
    with pytest.raises(SpecError, match="is not valid YAML"):
        load_spec_file(str(path))


def test_load_spec_file_non_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- rounds\n- 3\n")
    with pytest.raises(SpecError, match="expected a mapping at the top level"):
        load_spec_file(str(path))


def test_load_spec_file_reports_invalid_field(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("batch_size: 0\n")
    with pytest.raises(SpecError, match=r"^batch_size: "):
        load_spec_file(str(path))


@pytest.mark.parametrize(
    ("quorum", "per_round", "expected"),
    [(1.0, 8, 8), (0.5, 8, 4), (0.5, 3, 2), (0.26, 4, 2), (0.25, 4, 1), (0.01, 8, 1), (0.99, 8, 8)],
)
def test_quorum_count_rounds_up_and_is_at_least_one(quorum: float, per_round: int, expected: int) -> None:
    spec = JobSpec(quorum=quorum, num_clients=8, clients_per_round=per_round)
    assert spec.quorum_count == expected


def test_quickstart_example_parses() -> None:
    path = REPO / "examples" / "quickstart.yaml"
    spec = load_spec_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert spec.name == "quickstart"
    # Every value written in the file is what the spec holds (nothing dropped or coerced away).
    dumped = spec.model_dump()
    for key, value in raw.items():
        if isinstance(value, dict):
            assert {k: dumped[key][k] for k in value} == value, key
        else:
            assert dumped[key] == value, key
