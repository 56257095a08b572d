"""Align (PWFF's third stage): on-policy multi-objective alignment of a causal LM on each client.

A task repeats, for `local_steps` steps: take `prompts_per_step` of the client's prompts, sample
`samples_per_prompt` responses to each from the client's current model (global part + its
personal part), score every response with each of the job's reward models (`shared.rewards`),
normalize each reward by the client's running mean and std (so no reward dominates by its scale),
weigh them by the client's preferences, and take `ppo_epochs` clipped policy-gradient passes
with a leave-one-out (RLOO) or group-normalized (GRPO) baseline, a per-token KL penalty to the
reference model (the same frozen base with the adapters disabled: no second copy of the
weights) and a proximal pull towards the state the task started from.

The gradient of that surrogate comes from backpropagation (`estimator: backprop`) or from
forward gradients (`estimator: fwd`): central differences of the surrogate along seeded random
directions, so alignment runs with inference memory only. The reward is a black box either way.

The upload is the delta of the global part through the job's codec, merged like backprop's; the
personalization preset decides what is global (`pwff`: the shared feed-forward adapter; the
attention LoRA stays with the client). Each client's reward statistics and KL coefficient are
client-side state (kept beside its error-feedback residual, never uploaded).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from shared.codec import RESIDUAL_PREFIX, split_residual
from shared.generation import chat_prompt_ids
from shared.models import GLOBAL_RNG_LOCK, parameter_count
from shared.modes.backprop import DeltaAccumulator, make_optimizer, upload_from_model
from shared.modes.base import (
    ClientEvaluation,
    EvaluationContext,
    LocalContext,
    LocalResult,
    State,
    TaskFailed,
    TrainingMode,
)
from shared.seeding import derive_seed
from shared.wireless import backprop_step_flops, forward_flops

if TYPE_CHECKING:
    from shared.rewards import RewardCache
    from shared.spec import AlignSpec, JobSpec

STATS_PREFIX = "align/"
"""Client-side alignment state, stored beside the codec residual (`RESIDUAL_PREFIX + STATS_PREFIX + name`)."""

_EPS = 1e-6


# -- the pieces of the loss, each testable on its own ---------------------------------------------


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out baseline: each sample's reward minus the mean of the other k-1 of its prompt.

    `rewards` is [prompts * k], the k samples of a prompt contiguous.
    """
    grouped = rewards.view(-1, k)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Group baseline: (reward - group mean) / group std (population std, floored)."""
    grouped = rewards.view(-1, k)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + 1e-4)).reshape(-1)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(policy || reference) at each sampled token: exp(d) - d - 1 with d = ref - logp.

    Non-negative, and unbiased for the KL when the tokens are sampled from the policy (Schulman 2020).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's response tokens, then over sequences (every response counts alike)."""
    per_sequence = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_sequence.mean()


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> torch.Tensor:
    """PPO's clipped policy-gradient loss (to minimize), per token, averaged like `masked_mean`."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    return masked_mean(-torch.minimum(unclipped, clipped), mask)


@dataclass
class RewardStats:
    """A client's running mean and variance of each raw reward (Welford over every scored sample)."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def fresh(cls, rewards: int) -> RewardStats:
        return cls(torch.zeros(1), torch.zeros(rewards), torch.zeros(rewards))

    def update(self, batch: torch.Tensor) -> None:
        """Chan et al.'s parallel update with a [n, rewards] batch."""
        n = batch.shape[0]
        batch_mean = batch.mean(dim=0)
        batch_m2 = ((batch - batch_mean) ** 2).sum(dim=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(self.m2 / self.count.clamp(min=1)).clamp(min=1e-3)
        return (batch - self.mean) / std


def weighted_reward(raw: torch.Tensor, stats: RewardStats, weights: torch.Tensor) -> torch.Tensor:
    """The client's scalar reward per sample: its preference weights over the normalized rewards."""
    return stats.normalize(raw) @ weights


def next_kl_coef(coef: float, measured_kl: float, target: float, floor: float) -> float:
    """Adaptive KL penalty: double above 1.5x the target, halve under target / 1.5, never under `floor`."""
    if measured_kl > 1.5 * target:
        coef *= 2.0
    elif measured_kl < target / 1.5:
        coef /= 2.0
    return max(floor, coef)


# -- sampling and scoring -------------------------------------------------------------------------


def prompt_ids(tokenizer: PreTrainedTokenizerBase, align: AlignSpec, text: str) -> list[int]:
    """The chat-formatted prompt of one example (the text cut to max_prompt_tokens first)."""
    cut = tokenizer(text, add_special_tokens=False, truncation=True, max_length=align.max_prompt_tokens)["input_ids"]
    return chat_prompt_ids(tokenizer, align.prompt_template.format(text=tokenizer.decode(cut)))


@dataclass(frozen=True)
class Rollout:
    """Sampled responses to a batch of prompts, left-padded prompt + right-padded response."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    """[n, T-1] float: 1 where the next token (input_ids[:, 1:]) is a response token, EOS included."""
    prompts: list[str]
    responses: list[str]

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    align: AlignSpec,
    prompt_texts: Sequence[str],
    repeats: int,
    seed: int,
    greedy: bool = False,
) -> Rollout:
    """`repeats` sampled responses to each prompt (contiguous per prompt), seeded."""
    device = next(model.parameters()).device
    encoded = [prompt_ids(tokenizer, align, text) for text in prompt_texts for _ in range(repeats)]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    generator_kwargs: dict[str, object] = {
        "max_new_tokens": align.max_new_tokens,
        "pad_token_id": pad,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if greedy:
        generator_kwargs["do_sample"] = False
    else:
        generator_kwargs.update(do_sample=True, temperature=align.temperature, top_k=align.top_k or None, top_p=1.0)
    model.eval()
    # generate() draws from torch's process-wide generator; embedded workers share one process.
    with GLOBAL_RNG_LOCK:
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=attention, **generator_kwargs)  # type: ignore[operator]
    response = output[:, width:]
    eos = tokenizer.eos_token_id
    # A response ends at its first EOS (kept: ending is a choice the policy is rewarded for).
    is_eos = response == eos if eos is not None else torch.zeros_like(response, dtype=torch.bool)
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    keep = ~after_eos
    full_attention = torch.cat([attention, keep.long()], dim=1)
    response_mask = torch.cat([torch.zeros_like(attention[:, 1:]), keep.long()], dim=1).float()
    texts = [
        str(tokenizer.decode(row[mask], skip_special_tokens=True)).strip()
        for row, mask in zip(response, keep, strict=True)
    ]
    prompts = [text for text in prompt_texts for _ in range(repeats)]
    return Rollout(output, full_attention, response_mask, prompts, texts)


def token_logprobs(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """log pi(token) of every next token, [n, T-1] (with the graph when grads are enabled)."""
    logits = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=_position_ids(rollout.attention_mask),
    ).logits[:, :-1]
    targets = rollout.input_ids[:, 1:]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """The reference model's log-probs: the frozen base, every adapter disabled."""
    with model.disable_adapter():  # type: ignore[operator]
        return token_logprobs(model, rollout)


@dataclass(frozen=True)
class StepBatch:
    """One local step's samples and what the loss holds fixed while the policy moves."""

    rollout: Rollout
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    advantages: torch.Tensor


def surrogate_loss(
    model: torch.nn.Module, batch: StepBatch, clip_eps: float, kl_coef: float, with_grad: bool
) -> torch.Tensor:
    """The clipped policy-gradient loss plus kl_coef times the per-token KL to the reference."""
    mask = batch.rollout.response_mask
    with torch.set_grad_enabled(with_grad):
        logp = token_logprobs(model, batch.rollout)
        policy = clipped_surrogate(logp, batch.old_logp, batch.advantages, mask, clip_eps)
        return policy + kl_coef * masked_mean(kl_per_token(logp, batch.ref_logp), mask)


# -- the mode -------------------------------------------------------------------------------------


class AlignMode(TrainingMode):
    name = "align"

    def __init__(self) -> None:
        self._rewards: dict[Path, RewardCache] = {}
        self._reference_figures: dict[tuple[str, int, int], dict[str, float]] = {}
        self._lock = threading.Lock()

    # -- scheduler side

    def unit_flops(self, spec: JobSpec, params: int, tokens: int) -> float:
        align = spec.align
        sequences = align.prompts_per_step * align.samples_per_prompt
        seq_tokens = sequences * (align.max_prompt_tokens + align.max_new_tokens)
        sampling = forward_flops(params, seq_tokens)  # prefill + one token at a time with the KV cache
        scoring = 2 * forward_flops(params, seq_tokens)  # the old policy's and the reference's log-probs
        if align.estimator == "fwd":
            passes = align.ppo_epochs * 2 * align.perturbations * forward_flops(params, seq_tokens)
        else:
            passes = align.ppo_epochs * backprop_step_flops(params, seq_tokens, max(1, params // 200))
        return float(sampling + scoring + passes)

    def full_budget(self, spec: JobSpec) -> int:
        return spec.local_steps

    def task_fields(self, spec: JobSpec, budget: int) -> dict[str, int]:
        return {"local_steps": budget, "perturbations": 0}

    # -- worker side

    def rewards(self, cache_dir: Path | None) -> RewardCache:
        """The reward models of this process (loaded once per cache folder), as a worker caches its base model."""
        from shared.rewards import RewardCache
        from shared.settings import Settings

        folder = Path(cache_dir) if cache_dir is not None else Settings().cache_dir
        with self._lock:
            if folder not in self._rewards:
                self._rewards[folder] = RewardCache(folder)
            return self._rewards[folder]

    def run_local(self, context: LocalContext) -> LocalResult:
        spec, task = context.spec, context.task
        align = spec.align
        model = context.model
        weights = torch.tensor(align.weights_of(task.client, spec.num_clients, spec.seed), dtype=torch.float32)
        _, client_state = split_residual(context.personal)
        stats, kl_coef = _load_client_state(client_state, len(align.rewards), align.kl_coef)
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        start = {name: p.detach().clone() for name, p in params.items()}
        optimizer = make_optimizer(spec, list(params.values()))
        rng = np.random.default_rng(derive_seed("align-prompts", spec.seed, task.round, task.client, task.wave))
        texts = [example.text for example in context.examples]
        rewards = self.rewards(context.cache_dir)
        losses: list[float] = []
        flops = 0.0
        n_params = parameter_count(model)
        for step in range(task.local_steps):
            chosen = rng.choice(len(texts), size=min(align.prompts_per_step, len(texts)), replace=False)
            seed = derive_seed("align-sample", spec.seed, task.round, task.client, task.wave, step)
            prompts = [texts[i] for i in chosen]
            rollout = sample_responses(model, context.tokenizer, align, prompts, align.samples_per_prompt, seed)
            raw = _scores(rewards, spec, rollout)
            stats.update(raw)
            with torch.no_grad():
                batch = StepBatch(
                    rollout,
                    old_logp=token_logprobs(model, rollout),
                    ref_logp=reference_logprobs(model, rollout),
                    advantages=_advantages(align, weighted_reward(raw, stats, weights)),
                )
            measured_kl = float(masked_mean(kl_per_token(batch.old_logp, batch.ref_logp), rollout.response_mask))
            tokens = int(rollout.attention_mask.sum())
            flops += forward_flops(n_params, tokens) * 3  # sampling, old and reference log-probs
            surrogate = functools.partial(surrogate_loss, model, batch, align.clip_eps, kl_coef)

            for _ in range(align.ppo_epochs):
                if align.estimator == "fwd":
                    where = (spec.seed, task.round, task.client, task.wave, step, len(losses))
                    loss = _forward_gradient(
                        _perturbed(params),
                        surrogate,
                        align.perturbations,
                        spec.fwd.h,
                        derive_seed("align-dirs", *where),
                    )
                    flops += 2 * align.perturbations * forward_flops(n_params, tokens)
                else:
                    loss_t = surrogate(True)
                    loss_t.backward()
                    loss = float(loss_t.detach())
                    flops += backprop_step_flops(n_params, tokens, sum(p.numel() for p in params.values()))
                _add_proximal_gradient(params, start, align.proximal_mu)
                torch.nn.utils.clip_grad_norm_(list(params.values()), align.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss)
            if not all(math.isfinite(value) for value in losses[-align.ppo_epochs :]):
                raise TaskFailed(f"client {task.client}: the alignment loss is not finite at step {step}")
            kl_coef = next_kl_coef(kl_coef, measured_kl, align.kl_target, align.kl_coef)
        model.eval()
        payload, personal = upload_from_model(context, client_state)
        personal.update(_client_state(stats, kl_coef))
        return LocalResult(payload=payload, loss=float(np.mean(losses)), flops=float(flops), personal=personal)

    # -- client-side evaluation

    def evaluate_client(self, context: EvaluationContext) -> ClientEvaluation:
        """Each reward, the weighted reward, KL and length on held-out prompts, for the global and
        personalized models, and the reference (the base with adapters disabled) they started from."""
        from shared import data
        from shared.models import load_trainable_state

        spec, client = context.spec, context.client
        align = spec.align
        prompts = [e.text for e in data.client_test_examples(spec, client, align.eval_prompts)]
        weights = torch.tensor(align.weights_of(client, spec.num_clients, spec.seed), dtype=torch.float32)
        seed = derive_seed("align-eval", spec.seed, client)
        model = context.model
        load_trainable_state(model, context.global_state)
        key = (context.job_id, client, len(prompts))
        with self._lock:
            reference = self._reference_figures.get(key)
        if reference is None:
            with model.disable_adapter():  # type: ignore[operator]
                reference, _ = self._figures(context, prompts, weights, seed, adapters=False)
            with self._lock:
                self._reference_figures[key] = reference
        global_figures, global_rollout = self._figures(context, prompts, weights, seed)
        personal_figures, personal_rollout = global_figures, global_rollout
        if context.personal:
            load_trainable_state(model, {**context.global_state, **context.personal})
            personal_figures, personal_rollout = self._figures(context, prompts, weights, seed)
        figures = {f"reference_{k}": v for k, v in reference.items()}
        figures.update({f"global_{k}": v for k, v in global_figures.items()})
        figures.update({f"personalized_{k}": v for k, v in personal_figures.items()})
        figures["examples"] = float(len(prompts))
        group = align.group_of(client)
        if group is not None:
            figures["group"] = float(group)
        samples = [
            {
                "prompt": prompt[:300],
                "global": answer_global[:400],
                "personalized": answer_personal[:400],
            }
            for prompt, answer_global, answer_personal in list(
                zip(global_rollout.prompts, global_rollout.responses, personal_rollout.responses, strict=True)
            )[: align.eval_samples_kept]
        ]
        return ClientEvaluation(figures=figures, samples=samples)

    def _figures(
        self,
        context: EvaluationContext,
        prompts: list[str],
        weights: torch.Tensor,
        seed: int,
        adapters: bool = True,
    ) -> tuple[dict[str, float], Rollout]:
        spec, model = context.spec, context.model
        align = spec.align
        # The same seed for every model: global, personalized and reference answer with common random numbers.
        rollout = sample_responses(model, context.tokenizer, align, prompts, 1, seed)
        raw = _scores(self.rewards(context.cache_dir), spec, rollout)
        weighted = raw @ weights
        figures: dict[str, float] = {}
        for index, reward in enumerate(align.rewards):
            figures[f"reward_{reward.name}"] = float(raw[:, index].mean())
            figures[f"reward_{reward.name}_se"] = _standard_error(raw[:, index])
        figures["weighted_reward"] = float(weighted.mean())
        figures["weighted_reward_se"] = _standard_error(weighted)
        figures["length"] = float(rollout.lengths.mean())
        if adapters:
            with torch.no_grad():
                logp = token_logprobs(model, rollout)
                ref_logp = reference_logprobs(model, rollout)
            figures["kl"] = float(masked_mean(kl_per_token(logp, ref_logp), rollout.response_mask))
        else:
            figures["kl"] = 0.0
        return figures, rollout

    # -- aggregator side

    def accumulator(self, spec: JobSpec, start_state: State) -> DeltaAccumulator:
        return DeltaAccumulator(spec, start_state)


def _standard_error(values: torch.Tensor) -> float:
    if values.numel() < 2:
        return 0.0
    return float(values.std(unbiased=True) / math.sqrt(values.numel()))


def _scores(rewards: RewardCache, spec: JobSpec, rollout: Rollout) -> torch.Tensor:
    from shared.rewards import RewardError

    try:
        return rewards.score(spec.align.rewards, rollout.prompts, rollout.responses)
    except RewardError as error:
        raise TaskFailed(str(error)) from error


def _advantages(align: AlignSpec, rewards: torch.Tensor) -> torch.Tensor:
    if align.baseline == "grpo":
        return grpo_advantages(rewards, align.samples_per_prompt)
    return rloo_advantages(rewards, align.samples_per_prompt)


def _add_proximal_gradient(params: dict[str, torch.nn.Parameter], start: State, mu: float) -> None:
    """The gradient of (mu / 2) |theta - theta_start|^2, exact (no need to estimate it)."""
    if mu <= 0:
        return
    with torch.no_grad():
        for name, param in params.items():
            pull = mu * (param - start[name])
            if param.grad is None:
                param.grad = pull
            else:
                param.grad.add_(pull)


def _perturbed(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """What forward gradients perturb: LoRA B only, with A a fixed random projection (as LoRA-FA trains it).

    While B is zero (the start of every LoRA) the loss does not depend on A to first order, so
    perturbing A adds variance and no signal; without A the estimate has half the dimensions.
    Tensors that are not LoRA (a trainable head) are perturbed too.
    """
    chosen = {name: p for name, p in params.items() if "lora_A" not in name}
    for name, p in params.items():
        if name not in chosen:
            p.grad = None
    return chosen


def _forward_gradient(
    params: dict[str, torch.nn.Parameter],
    surrogate: Callable[[bool], torch.Tensor],
    perturbations: int,
    h: float,
    seed: int,
) -> float:
    """Sets each parameter's .grad to the mean of central-difference directional derivatives times the
    direction, over `perturbations` seeded Gaussian directions; returns the surrogate's value."""
    loss_of = surrogate
    generator = torch.Generator().manual_seed(seed)
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    center = float(loss_of(False))
    with torch.no_grad():
        for _ in range(perturbations):
            directions = {
                name: torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for name, p in params.items()
            }
            for name, p in params.items():
                p.add_(directions[name], alpha=h)
            plus = float(loss_of(False))
            for name, p in params.items():
                p.add_(directions[name], alpha=-2 * h)
            minus = float(loss_of(False))
            for name, p in params.items():
                p.add_(directions[name], alpha=h)
            derivative = (plus - minus) / (2 * h)
            if not math.isfinite(derivative):
                continue
            for name in params:
                grads[name].add_(directions[name], alpha=derivative / perturbations)
        for name, p in params.items():
            p.grad = grads[name]
    return center


def _load_client_state(state: State, rewards: int, kl_coef: float) -> tuple[RewardStats, float]:
    prefix = STATS_PREFIX
    if f"{prefix}count" not in state or state[f"{prefix}mean"].numel() != rewards:
        return RewardStats.fresh(rewards), kl_coef
    stats = RewardStats(state[f"{prefix}count"].clone(), state[f"{prefix}mean"].clone(), state[f"{prefix}m2"].clone())
    return stats, float(state[f"{prefix}kl_coef"])


def _client_state(stats: RewardStats, kl_coef: float) -> State:
    return {
        RESIDUAL_PREFIX + STATS_PREFIX + "count": stats.count,
        RESIDUAL_PREFIX + STATS_PREFIX + "mean": stats.mean,
        RESIDUAL_PREFIX + STATS_PREFIX + "m2": stats.m2,
        RESIDUAL_PREFIX + STATS_PREFIX + "kl_coef": torch.tensor([kl_coef]),
    }
