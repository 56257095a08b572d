"""Reward models of `mode: align` (shared.rewards) and `pwff train-reward`, with the real models: no mocks.

One short training run (the CLI's, into a session cache) serves every test that needs pwff's sentiment
classifier; the others load MiniLM-L6, alt-profanity-check or a tiny classifier written here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from services.cli import app
from shared.models import minilm_dir
from shared.rewards import RewardCache, RewardError, check_reward_folder, train
from shared.rewards.builtin import conciseness, keyword_share, words
from shared.spec import RewardSpec

CPU = torch.device("cpu")
POSITIVE = ["I love this, what a wonderful and happy day!", "Thank you so much, this is great news :)"]
NEGATIVE = ["I hate this, what a terrible and awful day.", "This is the worst, I am so angry and sad."]
TRAIN_STEPS = 40  # enough to order clearly positive above clearly negative text; seconds, not minutes


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.output


@pytest.fixture(scope="session")
def reward_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache whose rewards/positivity was written by `pwff train-reward` with its default --out."""
    cache = tmp_path_factory.mktemp("reward-cache")
    workdir = tmp_path_factory.mktemp("reward-workdir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PWFF_CACHE_DIR", str(cache))
        patch.setenv("COLUMNS", "200")
        patch.chdir(workdir)
        code, stdout, output = _invoke("train-reward", "--steps", str(TRAIN_STEPS), "--eval-examples", "100")
    assert code == 0, output
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["path"] == str(train.positivity_dir(cache))
    assert "held-out accuracy" in output
    assert list(workdir.iterdir()) == [], "train-reward must not write into the working folder"
    return cache


@pytest.fixture(scope="session")
def rewards(reward_cache_dir: Path) -> RewardCache:
    return RewardCache(reward_cache_dir, CPU)


# -- the package stays light -------------------------------------------------------------------------


def test_importing_the_package_and_checking_a_folder_loads_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from shared.rewards import check_reward_folder, RewardError\n"
        "try:\n"
        f"    check_reward_folder({str(tmp_path)!r}, 'align.rewards.1.path')\n"
        "except RewardError as error:\n"
        "    print(error)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].startswith("align.rewards.1.path: ") and "no config.json" in out[0]
    assert out[1] == "False"


# -- word-level rewards: exact values ---------------------------------------------------------------


def test_words_strip_punctuation_and_case() -> None:
    assert words("Hello, WORLD!  it's  -- fine.") == ["hello", "world", "it's", "fine"]
    assert words("") == []


def test_conciseness_exact_values(rewards: RewardCache) -> None:
    assert conciseness("one two three", 3) == 1.0
    assert conciseness("", 3) == 1.0
    assert conciseness("one two three four five six", 3) == pytest.approx(math.exp(-1.0))
    assert conciseness("a b c d", 2) == pytest.approx(math.exp(-1.0))
    spec = RewardSpec(name="short", kind="conciseness", target_words=2)
    scores = rewards.score([spec], ["p", "p", "p"], ["hi there", "a b c", "a b c d"])
    assert scores.shape == (3, 1) and scores.dtype == torch.float32
    assert scores[:, 0].tolist() == pytest.approx([1.0, math.exp(-0.5), math.exp(-1.0)])


def test_keyword_exact_values(rewards: RewardCache) -> None:
    assert keyword_share("Yes! yes, no... YES", "yes") == 0.75
    assert keyword_share("yesterday yes-man", "yes") == 0.0
    assert keyword_share("", "yes") == 0.0
    assert keyword_share("...", "yes") == 0.0
    spec = RewardSpec(name="say", kind="keyword", keyword="Banana")
    scores = rewards.score([spec], ["q"] * 3, ["banana", "I like bananas", "Banana, banana! ok ok"])
    assert scores[:, 0].tolist() == pytest.approx([1.0, 0.0, 0.5])


# -- model-backed built-ins ------------------------------------------------------------------------


def test_relevance_prefers_the_on_topic_reply(rewards: RewardCache) -> None:
    spec = RewardSpec(name="relevance", kind="relevance")
    prompts = ["My flight got cancelled and the airline won't refund my ticket."] * 2 + [
        "What is a good recipe for chocolate cake?"
    ] * 2
    responses = [
        "Sorry about your flight; ask the airline for a refund or a voucher for the cancelled ticket.",
        "Penguins live in the southern hemisphere and eat fish.",
        "Mix flour, sugar, cocoa and eggs, then bake the chocolate cake for 30 minutes.",
        "The stock market closed lower today.",
    ]
    scores = rewards.score([spec], prompts, responses)[:, 0]
    assert scores[0] > scores[1] + 0.2 and scores[2] > scores[3] + 0.2
    assert bool(((scores >= -1) & (scores <= 1 + 1e-5)).all())
    same = rewards.score([spec], ["hello there"], ["hello there"])
    assert float(same[0, 0]) == pytest.approx(1.0, abs=1e-5)


def test_harmlessness_scores_an_insult_below_a_polite_sentence(rewards: RewardCache) -> None:
    spec = RewardSpec(name="harmless", kind="harmlessness")
    scores = rewards.score(
        [spec], ["x"] * 3, ["Thank you, have a lovely day.", "You are a stupid fucking idiot.", "shut up, moron"]
    )[:, 0]
    assert scores[0] > 0.8
    assert scores[1] < 0.2 and scores[2] < scores[0]
    assert bool(((scores >= 0) & (scores <= 1)).all())


def test_positivity_uses_the_trained_folder(rewards: RewardCache, reward_cache_dir: Path) -> None:
    spec = RewardSpec(name="positivity", kind="positivity")
    scores = rewards.score([spec], [""] * 4, POSITIVE + NEGATIVE)[:, 0]
    assert min(scores[:2]) > max(scores[2:]), scores
    assert bool(((scores >= 0) & (scores <= 1)).all())
    meta = json.loads((train.positivity_dir(reward_cache_dir) / train.METADATA).read_text())
    assert meta["steps"] == TRAIN_STEPS and meta["labels"] == ["negative", "neutral", "positive"]


def test_reward_cache_loads_each_spec_once_and_stacks_columns(rewards: RewardCache) -> None:
    specs = [
        RewardSpec(name="short", kind="conciseness", target_words=1),
        RewardSpec(name="k", kind="keyword", keyword="a"),
    ]
    assert rewards.get(specs[0]) is rewards.get(specs[0])
    loaded: list[object] = []
    threads = [threading.Thread(target=lambda: loaded.append(rewards.get(specs[1]))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(model) for model in loaded}) == 1
    scores = rewards.score(specs, ["p", "p"], ["a", "a b"])
    assert torch.allclose(scores, torch.tensor([[1.0, 1.0], [math.exp(-1.0), 0.5]]))
    assert rewards.score(specs, [], []).shape == (0, 2)


# -- any HF sequence classifier --------------------------------------------------------------------


def test_hf_folder_scores_a_positive_text_above_a_negative_one(rewards: RewardCache, reward_cache_dir: Path) -> None:
    folder = str(train.positivity_dir(reward_cache_dir))
    check_reward_folder(folder, "align.rewards.0.path", label="positive")
    default = RewardSpec(name="pos", kind="hf", path=folder)  # the last label: positive
    by_name = RewardSpec(name="pos2", kind="hf", path=folder, label="Positive")
    negative = RewardSpec(name="neg", kind="hf", path=folder, label=0)
    scores = rewards.score([default, by_name, negative], [""] * 4, POSITIVE + NEGATIVE)
    assert torch.equal(scores[:, 0], scores[:, 1])
    assert min(scores[:2, 0]) > max(scores[2:, 0])
    assert max(scores[:2, 2]) < min(scores[2:, 2])


def test_not_a_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(RewardError, match=r"^align\.rewards\.1\.path: no such folder"):
        check_reward_folder(str(tmp_path / "missing"), "align.rewards.1.path")
    with pytest.raises(RewardError, match=r"^align\.rewards\.1\.path: .* \(no config\.json\)"):
        check_reward_folder(str(tmp_path), "align.rewards.1.path")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RewardError, match="cannot read"):
        check_reward_folder(str(tmp_path), "align.rewards.1.path")


def test_not_a_sequence_classifier_errors(tmp_path: Path) -> None:
    # The packaged MiniLM is a bare encoder (BertModel): a real folder that is not a classifier.
    with pytest.raises(RewardError, match=r"is not a sequence classifier \(architectures: \['BertModel'\]\)"):
        check_reward_folder(str(minilm_dir()), "align.rewards.1.path")
    with pytest.raises(ValidationError, match=r"reward 'enc': path: .* is not a sequence classifier"):
        RewardSpec(name="enc", kind="hf", path=str(minilm_dir()))
    # A spec validated elsewhere (another machine's folders): the worker checks again when it loads.
    spec = RewardSpec.model_construct(name="enc", kind="hf", path=str(minilm_dir()), label=None)
    with pytest.raises(RewardError, match=r"reward 'enc' path: .* is not a sequence classifier"):
        RewardCache(tmp_path, CPU).get(spec)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(RewardError, match="has no weights"):
        check_reward_folder(str(tmp_path), "align.rewards.1.path")


def test_unknown_label_errors(reward_cache_dir: Path) -> None:
    folder = str(train.positivity_dir(reward_cache_dir))
    with pytest.raises(RewardError, match=r"unknown label 'joy'; the classifier's labels: 0 'negative', 1 'neutral'"):
        check_reward_folder(folder, "align.rewards.1.path", label="joy")
    with pytest.raises(ValidationError, match="label index 3 out of range"):
        RewardSpec(name="x", kind="hf", path=folder, label=3)
    spec = RewardSpec.model_construct(name="x", kind="hf", path=folder, label=3)
    with pytest.raises(RewardError, match="label index 3 out of range"):
        RewardCache(reward_cache_dir, CPU).get(spec)


def test_unknown_kind_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="unknown reward model 'bleu'"):
        RewardSpec(name="b", kind="bleu")
    with pytest.raises(RewardError, match="reward 'b': unknown reward model 'bleu'"):
        RewardCache(tmp_path, CPU).get(RewardSpec.model_construct(name="b", kind="bleu"))


def test_non_finite_scores_fail_naming_the_reward(tmp_path: Path) -> None:
    """A real (tiny) classifier whose head puts out NaN: the cache refuses its scores."""
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.bias[1] = float("nan")
    model.save_pretrained(tmp_path / "broken")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "broken")
    specs = [
        RewardSpec(name="fine", kind="conciseness"),
        RewardSpec(name="broken", kind="hf", path=str(tmp_path / "broken")),
    ]
    cache = RewardCache(tmp_path, CPU)
    assert torch.isnan(cache.get(specs[1]).score(["a"], ["b"])).all()  # the model itself returns NaN
    with pytest.raises(RewardError, match=r"reward 'broken' \(hf\) returned a non-finite score \(nan\) for 2 of 2"):
        cache.score(specs, ["a", "b"], ["hello", "world"])


# -- training --------------------------------------------------------------------------------------


def test_train_reward_cli_writes_a_deterministic_hf_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PWFF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "clf"
    code, stdout, output = _invoke(
        "train-reward", "--out", str(out), "--steps", "2", "--seed", "3", "--eval-examples", "16"
    )
    assert code == 0, output
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["path"] == str(out) and summary["steps"] == 2 and 0 <= summary["accuracy"] <= 1
    assert "held-out accuracy" in output and "on 16 test tweets" in output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    check_reward_folder(str(out), "out")
    assert not (tmp_path / "cache").exists()  # --out given: nothing in the cache
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]  # no staging folder left behind

    again = train.train_sentiment(tmp_path / "again", steps=2, seed=3, eval_examples=16)
    first, second = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.accuracy == summary["accuracy"]


def test_ensure_positivity_trains_once_for_concurrent_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = train.train_sentiment

    def counted(out: Path, **kwargs: object) -> train.TrainResult:
        calls.append(out)
        return real(out, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train, "train_sentiment", counted)
    found: list[Path] = []
    threads = [
        threading.Thread(target=lambda: found.append(train.ensure_positivity(tmp_path, steps=1, eval_examples=8)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [train.positivity_dir(tmp_path)]
    assert found == [train.positivity_dir(tmp_path)] * 3
    check_reward_folder(str(found[0]), "positivity")
    assert sorted(p.name for p in (tmp_path / "rewards").iterdir()) == [".positivity.lock", "positivity"]
