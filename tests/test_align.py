"""Align mode: the pieces of the loss against hand-computed values, the spec's rules, and local alignment
of the tiny causal model on a reward it can learn."""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from services.cli import app as cli
from services.embedded import EmbeddedCluster
from services.results import write_results
from services.scheduler.api import create_app
from services.scheduler.core import Scheduler
from shared import data
from shared.adapters import ModelCache
from shared.bus import Queues
from shared.bus.memory import MemoryBus
from shared.metrics import TASKS_PROCESSED
from shared.models import initial_state, load_trainable_state, minilm_dir
from shared.modes.align import (
    RewardStats,
    StepBatch,
    _forward_gradient,
    _perturbed,
    clipped_surrogate,
    grpo_advantages,
    kl_per_token,
    masked_mean,
    next_kl_coef,
    reference_logprobs,
    rloo_advantages,
    sample_responses,
    surrogate_loss,
    token_logprobs,
    weighted_reward,
)
from shared.spec import JobSpec, SpecError, parse_spec
from shared.store.memory import MemoryStore

TOKEN = "align-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALIGN = {"mode": "align", "model": "tiny-llama", "dataset": "tweets-sentiment"}


# -- the loss, by hand ----------------------------------------------------------------------------


def test_rloo_advantage_is_reward_minus_the_mean_of_the_others() -> None:
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    # prompt 1: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; prompt 2: -1.5, -1.5, 3
    assert rloo_advantages(rewards, 3).tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]


def test_grpo_advantage_is_the_group_z_score() -> None:
    rewards = torch.tensor([1.0, 3.0, 5.0, 7.0])  # one prompt, k = 4: mean 4, population std sqrt(5)
    expected = [(r - 4.0) / (math.sqrt(5.0) + 1e-4) for r in (1.0, 3.0, 5.0, 7.0)]
    assert grpo_advantages(rewards, 4).tolist() == pytest.approx(expected)
    assert grpo_advantages(torch.tensor([2.0, 2.0]), 2).tolist() == [0.0, 0.0]  # a tie carries no signal


def test_kl_term_is_the_k3_estimate() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    # d = ref - logp = [-log 2, 0]: exp(d) - d - 1 = [0.5 + log 2 - 1, 0]
    assert kl_per_token(logp, ref).tolist()[0] == pytest.approx([math.log(2) - 0.5, 0.0])
    # averaged over each response's tokens, then over responses: the padding does not count
    values = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(masked_mean(values, mask)) == pytest.approx((2.0 + 2.0) / 2)


def test_clipped_surrogate_clips_the_ratio_like_ppo() -> None:
    old = torch.zeros(2, 1)
    mask = torch.ones(2, 1)
    logp = torch.tensor([[math.log(1.5)], [math.log(0.5)]])  # ratios 1.5 and 0.5
    advantages = torch.tensor([1.0, 1.0])
    # positive advantage: min(1.5, 1.2) = 1.2; min(0.5, 0.8) = 0.5 -> loss -(1.2 + 0.5) / 2
    assert float(clipped_surrogate(logp, old, advantages, mask, 0.2)) == pytest.approx(-0.85)
    # negative advantage: min(-1.5, -1.2) = -1.5; min(-0.5, -0.8) = -0.8 -> loss (1.5 + 0.8) / 2
    assert float(clipped_surrogate(logp, old, -advantages, mask, 0.2)) == pytest.approx(1.15)


def test_rewards_are_normalized_per_reward_before_weighing() -> None:
    stats = RewardStats.fresh(2)
    # The second reward is on a 100x larger scale; normalized, both weigh alike.
    batch = torch.tensor([[0.0, 0.0], [1.0, 100.0], [2.0, 200.0]])
    stats.update(batch[:1])
    stats.update(batch[1:])  # two updates equal one over the whole batch
    assert stats.mean.tolist() == pytest.approx([1.0, 100.0])
    assert (stats.m2 / stats.count).tolist() == pytest.approx([2 / 3, 20000 / 3])
    z = stats.normalize(batch)
    assert z[:, 0].tolist() == pytest.approx(z[:, 1].tolist())
    mixed = weighted_reward(batch, stats, torch.tensor([0.5, 0.5]))
    assert mixed.tolist() == pytest.approx(z[:, 0].tolist())


def test_kl_coefficient_adapts_around_the_target_and_never_drops_under_the_spec() -> None:
    assert next_kl_coef(0.1, 1.0, 0.5, 0.05) == 0.2
    assert next_kl_coef(0.2, 0.1, 0.5, 0.05) == 0.1
    assert next_kl_coef(0.05, 0.0, 0.5, 0.05) == 0.05
    assert next_kl_coef(0.1, 0.5, 0.5, 0.05) == 0.1


# -- the spec -------------------------------------------------------------------------------------


def test_align_spec_defaults_and_preferences() -> None:
    spec = parse_spec(ALIGN)
    assert [r.name for r in spec.align.rewards] == ["relevance", "positivity"]
    assert spec.align.weights_of(0, spec.num_clients, spec.seed) == [0.9, 0.1]
    assert spec.align.weights_of(1, spec.num_clients, spec.seed) == [0.1, 0.9]
    drawn = parse_spec({**ALIGN, "align": {"preferences": {"kind": "dirichlet", "alpha": 0.5}}})
    weights = [drawn.align.weights_of(c, drawn.num_clients, drawn.seed) for c in range(drawn.num_clients)]
    assert all(min(w) >= 0 and sum(w) == pytest.approx(1.0) for w in weights)
    assert weights == [drawn.align.weights_of(c, drawn.num_clients, drawn.seed) for c in range(drawn.num_clients)]
    assert len({tuple(w) for w in weights}) == drawn.num_clients


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "minilm-l6"}, "is a sequence classifier"),
        ({"align": {"preferences": {"groups": [[0.7, 0.4]]}}}, "must sum to 1"),
        (
            {"align": {"preferences": {"groups": [[1.2, -0.2]]}}},
            "groups.0.1: Input should be greater than or equal to 0",
        ),
        ({"align": {"preferences": {"groups": [[1.0]]}}}, "1 weights for 2 rewards"),
        ({"align": {"preferences": {"kind": "explicit", "weights": {0: [0.5, 0.5]}}}}, "missing clients [1, 2"),
        ({"align": {"rewards": [{"name": "a", "kind": "relevance"}]}}, "align.rewards"),
        ({"align": {"rewards": [{"name": "a", "kind": "nope"}, {"name": "b", "kind": "relevance"}]}}, "unknown reward"),
        ({"align": {"rewards": [{"name": "a", "kind": "hf"}, {"name": "b", "kind": "relevance"}]}}, "needs a path"),
        (
            {"align": {"rewards": [{"name": "a", "kind": "relevance"}, {"name": "a", "kind": "conciseness"}]}},
            "unique",
        ),
    ],
)
def test_bad_align_specs_name_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("[", r"\[")):
        parse_spec({**ALIGN, **change})


# -- local alignment of the tiny causal model, embedded --------------------------------------------


@dataclass
class AlignedJob:
    spec: JobSpec
    job_id: str
    job: dict[str, Any]
    store: MemoryStore
    results: Path
    keyword: str


def _toy_keyword(spec: JobSpec, cache_dir: Path) -> str:
    """The word the initial tiny model says most often: a reward on it has signal from the first step."""
    model, tokenizer = ModelCache(cache_dir).get(spec)
    load_trainable_state(model, initial_state(model, spec.seed))
    prompts = [e.text for e in data.client_examples(spec, 0)[:32]]
    rollout = sample_responses(model, tokenizer, spec.align, prompts, 2, seed=1)
    words = Counter(w for text in rollout.responses for w in re.findall(r"[a-z']+", text.lower()))
    return words.most_common(1)[0][0]


@pytest.fixture(scope="module")
def aligned(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AlignedJob:
    """A tiny align job whose only weighted reward is "say the keyword"; two clients, one round of five steps."""
    data_spec = {
        **ALIGN,
        "name": "align-toy",
        "num_clients": 2,
        "clients_per_round": 2,
        "rounds": 1,
        "local_steps": 5,
        "seed": 0,
        "optimizer": {"lr": 0.02},
        "personalization": {"preset": "pwff"},
        "align": {
            "rewards": [{"name": "concise", "kind": "conciseness"}, {"name": "concise2", "kind": "conciseness"}],
            "preferences": {"groups": [[1.0, 0.0]]},
            # Sampling among the 3 likeliest tokens: the tiny random model then repeats a few words often.
            "top_k": 3,
            "max_new_tokens": 8,
            "prompts_per_step": 8,
            "samples_per_prompt": 4,
            "eval_prompts": 32,
            "kl_coef": 0.01,
            "kl_target": 5.0,
        },
    }
    keyword = _toy_keyword(parse_spec(data_spec), cache_dir)
    data_spec["align"]["rewards"] = [
        {"name": "keyword", "kind": "keyword", "keyword": keyword},
        {"name": "concise", "kind": "conciseness"},
    ]
    spec = parse_spec(data_spec)
    out = tmp_path_factory.mktemp("align-results")
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
    return AlignedJob(spec, job_id, job, cluster.store, out, keyword)


def test_local_alignment_raises_the_weighted_reward_on_a_toy_reward(aligned: AlignedJob) -> None:
    last = aligned.job["metrics"][-1]
    for client, figures in last["per_client"].items():
        # Mean over 32 held-out prompts, with common random numbers for both models.
        gain = figures["personalized_weighted_reward"] - figures["reference_weighted_reward"]
        assert gain > 0.1 + 2 * figures["personalized_weighted_reward_se"], (client, figures)
        assert figures["personalized_kl"] < aligned.spec.align.kl_target
        assert figures["reference_kl"] == 0.0
        assert figures["group"] == 0.0 and figures["examples"] == 32.0
        assert len(figures["samples"]) == aligned.spec.align.eval_samples_kept
    assert last["client_mean_personalized_weighted_reward"] > last["client_mean_reference_weighted_reward"]
    # Still exported: a finished job's series linger (PWFF_METRICS_JOB_LINGER_S) for a last scrape.
    labels = {"job_id": aligned.job_id, "model": "personalized", "figure": "weighted_reward"}
    exported = REGISTRY.get_sample_value("pwff_client_mean_figure", labels)
    assert exported == pytest.approx(last["client_mean_personalized_weighted_reward"])
    assert (aligned.results / "metrics.png").is_file()
    assert (aligned.results / "clients" / "1" / "adapter_config.json").is_file()


def test_the_api_and_the_cli_answer_from_the_aligned_models(aligned: AlignedJob, cache_dir: Path) -> None:
    client = TestClient(create_app(Scheduler(MemoryBus(), aligned.store), TOKEN, cache_dir=cache_dir))
    url = f"/v1/jobs/{aligned.job_id}/generate"
    answer = client.post(url, json={"prompt": "how was your flight?", "client": 1, "max_new_tokens": 6}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "client-1" and answer.json()["round"] == 1 and answer.json()["tokens"] == 6
    global_answer = client.post(url, json={"prompt": "how was your flight?", "max_new_tokens": 6}, headers=AUTH)
    assert global_answer.json()["model"] == "global"
    assert client.post(url, json={"prompt": "x", "client": 7}, headers=AUTH).status_code == 422
    assert client.post(url, json={"prompt": ""}, headers=AUTH).status_code == 422
    assert client.post("/v1/jobs/nope/generate", json={"prompt": "x"}, headers=AUTH).status_code == 404

    # The CLI, from the results folder on this machine: the same model gives the same greedy answer.
    result = CliRunner().invoke(
        cli, ["generate", str(aligned.results), "how was your flight?", "--client", "1", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == answer.json()["text"]
    missing = CliRunner().invoke(cli, ["generate", str(aligned.results), "hi", "--client", "5"])
    assert missing.exit_code == 2 and "no such model" in missing.output


def test_a_classifier_job_refuses_to_generate(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"spec": parse_spec({"model": "tiny-bert"}).model_dump()}))
    result = CliRunner().invoke(cli, ["generate", str(tmp_path), "hi"])
    assert result.exit_code == 2 and "sequence classifier" in result.output


def test_a_reward_model_that_answers_nan_fails_the_task_clearly(cache_dir: Path, tmp_path: Path) -> None:
    """A real (tiny) classifier with a NaN head: the worker dead-letters the task, naming the reward."""
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    broken = BertForSequenceClassification(config)
    with torch.no_grad():
        broken.classifier.bias[1] = float("nan")
    broken.save_pretrained(tmp_path / "broken")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "broken")
    rewards = [
        {"name": "concise", "kind": "conciseness"},
        {"name": "broken", "kind": "hf", "path": str(tmp_path / "broken")},
    ]
    spec = parse_spec(
        {
            **ALIGN,
            "name": "align-nan",
            "num_clients": 1,
            "clients_per_round": 1,
            "rounds": 1,
            "local_steps": 1,
            "round_deadline_s": 3,
            "align": {"rewards": rewards, "max_new_tokens": 4, "prompts_per_step": 1, "samples_per_prompt": 2},
        }
    )
    failed_before = TASKS_PROCESSED.labels(outcome="failed")._value.get()
    with EmbeddedCluster(cache_dir) as cluster:
        job = cluster.wait(cluster.scheduler.submit(spec), poll_s=0.05)
        dead = cluster.bus.depth(Queues.dead(Queues("pwff").tasks))
    assert TASKS_PROCESSED.labels(outcome="failed")._value.get() == failed_before + 1
    assert dead == 1
    # With nobody left, the round's deadline fails the job and says why; services stay up.
    assert job["state"] == "failed" and "0 of 1 updates" in job["error"]


def test_forward_gradients_estimate_the_surrogate_gradient_on_lora_b(cache_dir: Path) -> None:
    """Central differences along seeded directions point where backprop does; LoRA A is left alone."""
    spec = parse_spec({**ALIGN, "align": {"max_new_tokens": 4, "samples_per_prompt": 2, "top_k": 3}})
    model, tokenizer = ModelCache(cache_dir).get(spec)
    load_trainable_state(model, initial_state(model, spec.seed))
    rollout = sample_responses(model, tokenizer, spec.align, ["good morning", "my bag is lost"], 2, seed=3)
    with torch.no_grad():
        batch = StepBatch(
            rollout, token_logprobs(model, rollout), reference_logprobs(model, rollout), torch.tensor([1.0, -1.0] * 2)
        )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    surrogate_loss(model, batch, 0.2, 0.05, True).backward()
    exact = {n: p.grad.clone() for n, p in params.items() if "lora_B" in n and p.grad is not None}
    for p in params.values():
        p.grad = None
    perturbed = _perturbed(params)
    assert perturbed and all("lora_A" not in name for name in perturbed)
    _forward_gradient(perturbed, functools.partial(surrogate_loss, model, batch, 0.2, 0.05), 128, 1e-3, seed=5)
    estimate = torch.cat([params[n].grad.flatten() for n in exact])
    truth = torch.cat([exact[n].flatten() for n in exact])
    cosine = float(torch.nn.functional.cosine_similarity(estimate, truth, dim=0))
    dims = truth.numel()
    assert cosine > 5 / math.sqrt(dims), (cosine, dims)  # a random direction: about 1 / sqrt(dims)
    assert all(params[n].grad is None for n in params if "lora_A" in n)
