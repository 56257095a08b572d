"""The job spec: everything a federated fine-tuning job is, validated once at the edge.

A job is fully described by its spec and seed: workers and the aggregator derive
data shards, client samples and initial weights from it, so nothing else needs
to travel with a task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from shared.catalog import DATASETS, MODELS, LocalData, dataset_info, is_model_folder_ref, model_info
from shared.registry import MODES, PRESETS, REWARDS, STRATEGIES
from shared.wireless import DevicesSpec


@dataclass(frozen=True, eq=False)  # hashed by identity: a field may be a union of it and another type
class OneOf:
    """Annotated metadata: a string field whose allowed values are a registry's names (an enum in the schema)."""

    registry: Mapping[str, object]
    what: str

    def check(self, value: str) -> str:
        if value not in self.registry:
            raise ValueError(f"unknown {self.what} {value!r}; known: {', '.join(self.registry)}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(schema), "enum": list(self.registry)}


@dataclass(frozen=True)
class ModelOrFolder:
    """Annotated metadata: a packaged model's name, or a path to a local Hugging Face model folder."""

    def check(self, value: str) -> str:
        model_info(value)  # a clear error for an unknown name or a folder pwff will not load
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        base = handler(schema)
        return {
            "anyOf": [
                {"type": "string", "enum": list(MODELS)},
                {"type": "string", "pattern": r"^(/|\./|\.\./|~/)", "description": "a local model folder"},
            ],
            **{k: v for k, v in base.items() if k not in ("type",)},
        }


ModelName = Annotated[str, ModelOrFolder()]
ModuleName = Annotated[str, Field(min_length=1, max_length=200)]
"""A module name or glob pattern: bounded, so a spec cannot grow without limit (the API stores it)."""
DatasetName = Annotated[str, OneOf(DATASETS, "data set")]
ModeName = Annotated[str, OneOf(MODES, "training mode")]
PresetName = Annotated[str, OneOf(PRESETS, "personalization preset")]
StrategyName = Annotated[str, OneOf(STRATEGIES, "aggregation strategy")]
RewardKindName = Annotated[str, OneOf(REWARDS, "reward model")]


_NAME_TAG, _LOCAL_TAG = "data set name", "local source"
DatasetChoice = Annotated[
    Annotated[DatasetName, Tag(_NAME_TAG)] | Annotated[LocalData, Tag(_LOCAL_TAG)],
    # A mapping is a local source, anything else a name: errors then come from that branch alone.
    Discriminator(lambda value: _LOCAL_TAG if isinstance(value, dict | LocalData) else _NAME_TAG),
]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a spec must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionSpec(_Strict):
    kind: Literal["iid", "dirichlet", "natural"] = Field(
        "dirichlet",
        description="iid: uniform shards; dirichlet: label skew drawn per client; natural: one natural group "
        "(e.g. a novel) per client",
    )
    alpha: float = Field(0.5, gt=0, le=1e6, description="Dirichlet concentration; smaller means more label skew")
    min_examples: int = Field(
        8, ge=1, le=1_000_000, description="every client gets at least this many training examples"
    )


class LoraSpec(_Strict):
    r: int = Field(8, ge=1, le=256, description="LoRA rank")
    alpha: int = Field(16, ge=1, le=4096, description="LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[ModuleName] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="module names to adapt (at most 64, each up to 200 characters); default depends on the model "
        "(query/value, q_proj/v_proj)",
    )
    train_head: bool = Field(True, description="train the classifier head too (sequence classification only)")
    full: bool = Field(
        False,
        description="full fine-tuning instead of a LoRA: every base weight (and the head) is trained, uploaded as "
        "a delta and averaged; r, alpha, dropout, target_modules and train_head are then unused. Needs "
        "mode backprop and a preset that keeps no LoRA tensor personal (none, head), and a model whose float32 "
        "weights fit the 512 MiB bound on a stored state (minilm-l6, tiny models)",
    )


class OptimizerSpec(_Strict):
    """The client's local optimizer (backprop mode)."""

    name: Literal["adamw", "sgd"] = Field("adamw", description="local optimizer")
    lr: float = Field(1e-3, gt=0, le=10, description="local learning rate")
    weight_decay: float = Field(0.0, ge=0, le=10, description="decoupled (AdamW) or L2 (SGD) weight decay")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (ignored by AdamW)")


class RobustSpec(_Strict):
    """Parameters of the robust strategies (`shared.robust`): clip, median, trimmed_mean, krum.

    They treat every client alike (a client's self-reported num_samples is not trusted).
    """

    clip_norm: float = Field(
        1.0, gt=0, le=1e6, description="clip: each client's delta is scaled to at most this L2 norm before the mean"
    )
    trim_fraction: float = Field(
        0.25,
        ge=0,
        lt=0.5,
        description="trimmed_mean: fraction of the round's values dropped at each end, per coordinate "
        "(floor(fraction x clients) per side; must drop at least one)",
    )
    byzantine: int = Field(
        1, ge=0, le=10_000, description="krum: f, the Byzantine clients tolerated (needs clients_per_round > 2f + 2)"
    )
    krum_selected: int = Field(
        1,
        ge=1,
        le=10_000,
        description="krum: m, the lowest-scoring deltas averaged (1: Krum; more: Multi-Krum; at most "
        "clients_per_round - f)",
    )
    max_buffer_mb: float = Field(
        1024.0,
        gt=0,
        le=65_536,
        description="median, trimmed_mean, krum: memory bound of the round's buffered deltas (float32 MiB); "
        "an update past it is rejected and the round commits from the buffered ones",
    )


class AggregationSpec(_Strict):
    """How the server merges the clients' updates into the global part."""

    strategy: StrategyName = Field(
        "fedavg",
        description="aggregation strategy (a registered class): fedavg (weighted mean), or a robust one: clip "
        "(norm clipping), median (coordinate-wise), trimmed_mean, krum ((Multi-)Krum)",
    )
    server_lr: float = Field(1.0, gt=0, le=10, description="step size applied to the averaged update")
    weighting: Literal["samples", "uniform"] = Field(
        "samples",
        description="fedavg: weigh each client by its number of examples, or all alike (robust strategies: alike)",
    )
    robust: RobustSpec = Field(RobustSpec(), description="parameters of the robust strategies")


class ForwardSpec(_Strict):
    """FwdLLM: backprop-free training from forward gradients (mode `fwd`)."""

    estimator: Literal["fd", "jvp"] = Field(
        "fd", description="fd: central difference from two perturbed inferences; jvp: exact, one pass"
    )
    h: float = Field(1e-3, gt=0, le=1, description="perturbation size of the central difference")
    perturb: Literal["all", "lora", "head"] = Field("all", description="which trainable tensors are perturbed")
    perturbations_per_task: int = Field(16, ge=1, le=4096, description="K: directions a task evaluates")
    candidates: int = Field(10, ge=1, le=1000, description="C: a task scores C x K candidates and keeps the K best")
    # Both refinements are off by default: every measurement so far (README, "FwdLLM convergence" and
    # "Local zeroth-order steps") found discriminative sampling costing accuracy (its bias along the
    # reference gradient) and adaptive variance control buying none for its extra perturbations.
    discriminative: bool = Field(
        False, description="choose directions by cosine with the previous global gradient (local: own previous step)"
    )
    variance_control: Literal["adaptive", "fixed"] = Field(
        "fixed",
        description="adaptive: ask for more perturbations while the variance is above the threshold; fixed: one "
        "wave per step (fedsgd), perturbations_per_local_step per local step (local)",
    )
    variance_threshold: float = Field(0.5, gt=0, le=1e6, description="normalized split-half variance that ends a step")
    max_perturbations_per_step: int = Field(
        1024, ge=1, le=1_000_000, description="cap on perturbations per step (all waves)"
    )
    upload: Literal["seeds", "dense", "pool"] = Field(
        "seeds",
        description="seeds: (seed, g, loss) triples (fedsgd) or the per-step trajectory (local); dense: the "
        "client's summed estimate (fedsgd) or delta (local) as tensors; pool (local only): directions are drawn "
        "from a pool of `seed_pool` seeds and the client uploads one float16 coefficient per pool seed, whatever "
        "the number of local steps and perturbations (FedKSeed)",
    )
    seed_pool: int = Field(1000, ge=1, le=100_000, description="pool upload: seeds in a task's pool")
    lr: float = Field(0.01, gt=0, le=100, description="server SGD learning rate on the estimated gradient")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="constant, or cosine decay over the job's rounds to lr_min: of the server's lr (fedsgd) or "
        "of the clients' local_lr (local)",
    )
    lr_min: float = Field(0.0, ge=0, le=100, description="the cosine schedule's final learning rate (either regime)")
    momentum: float = Field(0.0, ge=0, lt=1, description="server SGD momentum on the gradient estimate")
    regime: Literal["fedsgd", "local"] = Field(
        "fedsgd",
        description="fedsgd: a round is one global step estimated from every client's perturbations (FwdLLM); "
        "local: each task runs local_steps zeroth-order steps on its client and uploads its trajectory "
        "(seed indices and directional derivatives per step), which the aggregator replays into a delta",
    )
    perturbations_per_local_step: int = Field(
        64, ge=1, le=4096, description="local: directions each local step evaluates (at least)"
    )
    max_perturbations_per_local_step: int = Field(
        256, ge=1, le=16_384, description="local: cap on directions per local step under adaptive variance control"
    )
    local_lr: float = Field(
        0.1, gt=0, le=100, description="local: the client's SGD learning rate (round 1's under the cosine lr_schedule)"
    )
    local_momentum: float = Field(0.9, ge=0, lt=1, description="local: the client's SGD momentum")
    discriminative_every: int = Field(
        2,
        ge=1,
        le=1000,
        description="local: apply discriminative sampling on every n-th local step only (FwdLLM's code: 2; "
        "every step measured 5 points worse)",
    )


class RewardSpec(_Strict):
    """One reward model of an align job (`shared.rewards`): higher is better, scored in the worker."""

    name: str = Field(
        min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$", description="the reward's label in figures"
    )
    kind: RewardKindName = Field(
        description="relevance (MiniLM-L6 cosine of prompt and response), positivity (pwff's own tweets sentiment "
        "classifier, trained once by `pwff train-reward`), harmlessness (1 - p(offensive), alt-profanity-check), "
        "conciseness (1 at target_words or fewer, falling with length), keyword (share of words that are "
        "`keyword`), hf (any Hugging Face sequence-classification folder)"
    )
    path: str | None = Field(
        None, max_length=4096, description="hf: a sequence-classification folder (config.json and weights)"
    )
    label: int | str | None = Field(
        None, description="hf: the label whose probability is the reward (index or name; default: the last)"
    )
    keyword: str | None = Field(None, min_length=1, max_length=40, description="keyword: the rewarded word")
    target_words: int = Field(20, ge=1, le=1000, description="conciseness: responses this short score 1")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> RewardSpec:
        if self.kind == "hf":
            if not self.path:
                raise ValueError(f"reward {self.name!r}: kind 'hf' needs a path to a sequence-classification folder")
            from shared.rewards import check_reward_folder  # torch-free: reads config.json only

            # Checked where the job is submitted: reward folders live on storage every worker mounts.
            check_reward_folder(self.path, f"reward {self.name!r}: path", self.label)
        if self.kind == "keyword" and not self.keyword:
            raise ValueError(f"reward {self.name!r}: kind 'keyword' needs a keyword")
        return self


Weights = Annotated[
    list[Annotated[float, Field(ge=0, le=1)]],
    Field(min_length=1, max_length=8, description="one weight per reward, in the order of align.rewards; sum 1"),
]


class PreferenceSpec(_Strict):
    """Each client's weights over the job's rewards (non-negative, summing to 1)."""

    kind: Literal["groups", "dirichlet", "explicit"] = Field(
        "groups",
        description="groups: client c takes groups[c mod len(groups)]; dirichlet: drawn per client from a seeded "
        "Dirichlet(alpha); explicit: `weights` lists every client's",
    )
    groups: list[Weights] = Field(
        default_factory=lambda: [[0.9, 0.1], [0.1, 0.9]], min_length=1, description="groups: each group's weights"
    )
    alpha: float = Field(1.0, gt=0, le=1e6, description="dirichlet: concentration (small: clients lean to one reward)")
    weights: dict[int, Weights] | None = Field(
        None,
        description="explicit: client (0-based) -> its weights",
        json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}},
    )


class AlignSpec(_Strict):
    """PWFF's local multi-objective alignment of a causal LM (mode `align`).

    Each task samples `samples_per_prompt` responses to each of `prompts_per_step` of the client's
    prompts from its current model, scores them with every reward, normalizes each reward by the
    client's running mean and std, weighs them by the client's preferences and takes a clipped
    policy-gradient step (RLOO or GRPO baseline) with a per-token KL penalty to the frozen base
    (adapters disabled) and a proximal term to the state the task started from.
    """

    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [
            RewardSpec(name="relevance", kind="relevance"),
            RewardSpec(name="positivity", kind="positivity"),
        ],
        min_length=2,
        max_length=8,
        description="the reward models (at least two)",
    )
    preferences: PreferenceSpec = Field(PreferenceSpec(), description="each client's weights over the rewards")
    estimator: Literal["backprop", "fwd"] = Field(
        "backprop",
        description="backprop: the surrogate's gradient by backpropagation; fwd: by forward gradients (central "
        "differences along seeded random directions), inference memory only",
    )
    baseline: Literal["rloo", "grpo"] = Field(
        "rloo", description="rloo: leave-one-out mean of the other samples; grpo: group mean, divided by its std"
    )
    prompt_template: str = Field(
        "Reply to this message: {text}", min_length=1, max_length=500, description="the user turn; {text} is a prompt"
    )
    prompts_per_step: int = Field(2, ge=1, le=256, description="prompts per local step")
    samples_per_prompt: int = Field(4, ge=2, le=64, description="k: responses sampled per prompt")
    max_new_tokens: int = Field(24, ge=1, le=512, description="longest sampled response")
    max_prompt_tokens: int = Field(64, ge=4, le=2048, description="prompts are cut to this many tokens")
    temperature: float = Field(1.0, gt=0, le=5, description="sampling temperature")
    top_k: int = Field(0, ge=0, le=100_000, description="sample from the k likeliest tokens (0: all)")
    kl_coef: float = Field(
        0.2,
        ge=0,
        le=100,
        description="beta: weight of the per-token KL to the reference (the floor of the adaptive coefficient)",
    )
    kl_target: float = Field(
        0.5,
        gt=0,
        description="nats per token: the KL a client's model may reach; beta doubles (per client) when a step "
        "exceeds it by half and halves when it is under half of it",
    )
    proximal_mu: float = Field(
        0.01, ge=0, le=1e4, description="mu: (mu / 2) |theta - theta_start|^2 to the task's start"
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clipping of the probability ratio")
    ppo_epochs: int = Field(2, ge=1, le=16, description="optimizer passes over each step's samples")
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="gradient clipping")
    perturbations: int = Field(16, ge=1, le=4096, description="fwd: directions per optimizer pass")
    eval_prompts: int = Field(16, ge=1, le=1024, description="held-out prompts per client evaluation")
    eval_samples_kept: int = Field(3, ge=0, le=32, description="responses per client and round kept in metrics")

    def weights_of(self, client: int, num_clients: int, seed: int) -> list[float]:
        """The client's preference weights over `rewards` (in order)."""
        prefs = self.preferences
        if prefs.kind == "explicit":
            assert prefs.weights is not None  # checked by the job spec
            return prefs.weights[client]
        if prefs.kind == "groups":
            return prefs.groups[client % len(prefs.groups)]
        import numpy as np  # a light import; the spec stays torch-free

        draws = np.random.default_rng([seed, 0xA11C]).dirichlet([prefs.alpha] * len(self.rewards), size=num_clients)
        return [float(w) for w in draws[client]]

    def group_of(self, client: int) -> int | None:
        """The client's preference group (groups preferences), else None."""
        return client % len(self.preferences.groups) if self.preferences.kind == "groups" else None


class PersonalizationSpec(_Strict):
    """Global partial aggregation: which trainable tensors are averaged and which stay with each client.

    Presets: `none` (everything global: FedAvg); `pwff` (a shared adapter is aggregated and a
    personal LoRA stays on the client: the adapter is a low-rank parallel adapter on each block's
    feed-forward output, the personal LoRA the attention one); `fedsa` (LoRA A global, LoRA B
    personal); `head` (the classifier head personal). `personal` adds glob patterns over tensor
    names (e.g. "*.layer.5.*") to whatever the preset keeps personal.
    """

    preset: PresetName = Field("none", description="which tensors stay personal (a registered preset)")
    personal: list[ModuleName] = Field(
        default_factory=list,
        max_length=64,
        description="extra glob patterns of personal tensors (at most 64, each up to 200 characters)",
    )
    # Rank 4: the adapter reads the wide feed-forward activation (4x the hidden size), so at the
    # attention LoRA's rank 8 it would upload more than FedAvg of that LoRA; at 4 it uploads ~60%.
    adapter_r: int = Field(4, ge=1, le=256, description="pwff: rank of the shared feed-forward adapter")
    eval_every: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="evaluate every client's models every this many rounds (default: every round when "
        "something is personal, else only after the last round, which also publishes every client's model)",
    )

    def evaluates_after(self, round_: int, rounds: int) -> bool:
        if round_ >= rounds:
            return True
        personalized = PRESETS[self.preset].personalizes or bool(self.personal)
        every = self.eval_every or (1 if personalized else rounds)
        return round_ % every == 0

    eval_examples_per_client: int = Field(64, ge=1, le=100_000, description="held-out examples per client evaluation")


class BudgetSpec(_Strict):
    """Compute budgets from the wireless model: how much local work each device gets per round."""

    kind: Literal["fixed", "deadline"] = Field(
        "fixed", description="fixed: every task gets local_steps/perturbations; deadline: as much as fits"
    )
    device_deadline_s: float = Field(
        60.0, gt=0, le=86_400, description="simulated per-round deadline of a device (at most a day)"
    )
    min_steps: int = Field(1, ge=1, le=100_000, description="never give a selected device less than this")
    selection: Literal["random", "delay", "energy"] = Field(
        "random", description="sample clients at random, or prefer the lowest expected delay or energy"
    )


class CompressionSpec(_Strict):
    """How updates, and the per-round downloads, are encoded on the wire (`shared.codec`).

    An upload is the client's delta, optionally sparsified (`topk`: the largest entries of each
    tensor by magnitude, with a bitmap of where they are), then either cast to `dtype` or quantized
    block-wise (`quantize`: int8 or 4-bit, one bfloat16 scale per `block_size` values, unbiased
    stochastic rounding seeded from the job seed, round, client and wave), then zstd. With
    `error_feedback` each client keeps what its codec dropped and adds it to its next update.
    Workers keep the global state between tasks and download each round's committed delta,
    encoded as `download` says (a lossy one carries the server's own residual into the next round).
    """

    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="tensor dtype of uploads (of the kept values, with top-k) when not quantized"
    )
    zstd_level: int = Field(3, ge=1, le=22, description="zstd compression level of uploads")
    quantize: Literal["none", "int8", "int4"] = Field(
        "none", description="block-wise quantization of uploads: int8 or 4-bit values with one scale per block"
    )
    block_size: int = Field(64, ge=8, le=65536, description="values per quantization block (one bfloat16 scale each)")
    rounding: Literal["stochastic", "nearest"] = Field(
        "stochastic", description="quantization rounding: stochastic (unbiased, seeded) or round-to-nearest"
    )
    topk: float | None = Field(
        None, gt=0, le=1, description="top-k sparsification: the fraction of each tensor's entries uploaded"
    )
    error_feedback: bool = Field(
        False, description="each client adds what its codec did not send last time to its next update"
    )
    download: Literal["float32", "float16", "bfloat16", "int8", "int4"] = Field(
        "float32", description="encoding of the per-round committed delta that workers download"
    )


SUMMING_STRATEGIES = frozenset({"fedavg"})
"""Strategies that need only the (weighted) sum of a round's updates, so secure aggregation can
hide each one; median, trimmed mean, Krum and the like read individual updates."""


class SecureAggregationSpec(_Strict):
    """Pairwise-masked secure aggregation (`shared.secagg`): the server learns only the sum of a round's updates.

    Each round runs three waves of tasks: key advertisement, training with the masked upload and
    encrypted Shamir shares, then unmasking by the survivors. Updates are clipped per coordinate to
    [-clip, clip], pre-multiplied by the client's FedAvg weight (its examples, or 1 with uniform
    weighting), and fixed-point encoded as integers mod 2^bits, with the largest power-of-two scale
    that cannot overflow the round's total weight.
    """

    enabled: bool = Field(False, description="mask every upload; the aggregator sees only the round's sum")
    threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of the round's advertised clients whose shares rebuild a secret "
        "(t = max(2, ceil(threshold x clients))); fewer survivors than t fail the round",
    )
    bits: int = Field(32, ge=16, le=62, description="masks and fixed-point values are integers modulo 2^bits")
    clip: float = Field(1.0, gt=0, le=1e6, description="each update coordinate is clipped to [-clip, clip]")


class PrivacySpec(_Strict):
    """Client-level differential privacy (DP-FedAvg, `shared.privacy`); absent: none.

    Each client's update of the global part is clipped to L2 norm `clip_norm` (over all its tensors)
    and Gaussian noise of std noise_multiplier x clip_norm is added to the round's sum, which is
    divided by clients_per_round. Needs aggregation strategy fedavg with weighting uniform, and a
    mode whose uploads are deltas (backprop, align, auto, fwd with regime local; client noise:
    backprop or align).
    """

    clip_norm: float = Field(gt=0, le=1e6, description="C: the L2 norm each client's update is clipped to")
    noise_multiplier: float = Field(
        ge=0, le=100, description="z: the noise on the round's sum has std z x C (0: clipping only, no privacy)"
    )
    noise: Literal["server", "client"] = Field(
        "server",
        description="server: the aggregator clips each update and adds the noise to the sum once per round; "
        "client: each client clips its own update and adds a share of std z C / sqrt(clients_per_round)",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta epsilon is reported at")


_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
_LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"


class TolerationSpec(_Strict):
    """A Kubernetes toleration for a job's own worker pool (keys as in a pod spec)."""

    key: str = Field("", max_length=253, description="taint key ('' with operator Exists: every taint)")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal matches value; Exists any value")
    value: str = Field("", max_length=63, description="taint value (operator Equal)")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field("", description="'' matches any")
    toleration_seconds: int | None = Field(None, ge=0, description="NoExecute: how long the pod stays bound")


class ResourcesSpec(_Strict):
    """The job's own worker pool (services.scaler runs it as a Deployment and deletes it when the job ends).

    Unset fields take the chart's `scaler.pools` defaults.
    """

    gpus: int = Field(0, ge=0, le=64, description="GPUs per worker (the chart's GPU resource name, nvidia.com/gpu)")
    memory: str | None = Field(None, pattern=_QUANTITY, description="memory per worker (request = limit), e.g. 16Gi")
    cpu: str | None = Field(None, pattern=_QUANTITY, description="CPU request per worker, e.g. 2 or 500m")
    node_selector: dict[Annotated[str, Field(pattern=_LABEL_KEY)], Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        description="node labels the pool's pods must have",
        # patternProperties alone would let any other key through in the schema; the validator rejects it.
        json_schema_extra={"additionalProperties": False},
    )
    tolerations: list[TolerationSpec] = Field(default_factory=list, max_length=32, description="taints tolerated")
    max_workers: int = Field(4, ge=1, le=1000, description="most workers the pool scales to")


CLIENT_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
"""A client identity: it names the client's task queue, its key and (on a real deployment) its broker user."""


class ClientsSpec(_Strict):
    """Who the job's clients are: shards of the data set (pool) or data owners' own workers (bound)."""

    kind: Literal["pool", "bound"] = Field(
        "pool",
        description="pool: client c is shard c of `dataset`, trained by any worker of the platform (simulations, "
        "benchmarks); bound: client c is the identity ids[c], trained only by a worker started for it "
        "(`pwff worker --client ID --data FILE`) on its own local data, and its updates must carry that "
        "client's enrolled signature",
    )
    ids: list[Annotated[str, Field(pattern=CLIENT_ID_PATTERN)]] | None = Field(
        None,
        min_length=1,
        max_length=10_000,
        description="bound: the clients' identities, in client order (num_clients follows from them)",
    )

    @model_validator(mode="after")
    def _ids_of_kind(self) -> ClientsSpec:
        if self.kind == "bound":
            if not self.ids:
                raise ValueError("clients.kind 'bound' needs clients.ids (one identity per client)")
            repeated = sorted({i for i in self.ids if self.ids.count(i) > 1})
            if repeated:
                raise ValueError(f"clients.ids repeats {', '.join(repeated)}")
        elif self.ids is not None:
            raise ValueError("clients.ids is only for clients.kind 'bound'")
        return self

    def identity(self, client: int) -> str | None:
        """The identity of client index `client` in a bound job, None in a pool job."""
        return self.ids[client] if self.kind == "bound" and self.ids is not None else None


class PoisonSpec(_Strict):
    """TEST/BENCHMARK SIMULATION ONLY: some clients upload a poisoned delta instead of their own."""

    fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="SIMULATION ONLY: fraction of the clients that are poisoned (round(fraction x num_clients), "
        "drawn from the seed, the same all job long); 0: none",
    )
    kind: Literal["nan", "scale", "sign_flip", "noise"] = Field(
        "scale",
        description="SIMULATION ONLY: nan (every value NaN), scale (delta x scale), sign_flip (minus the delta), "
        "noise (Gaussian noise, scale x the delta's RMS as its standard deviation)",
    )
    scale: float = Field(1000.0, gt=0, le=1e6, description="SIMULATION ONLY: the factor of `scale` and `noise`")


class SimulationSpec(_Strict):
    """TEST/BENCHMARK SIMULATION ONLY: faults injected by the workers, to measure what the server withstands."""

    poison: PoisonSpec = Field(
        PoisonSpec(),
        description="SIMULATION ONLY: poisoned clients (delta uploads: modes backprop and align); never set "
        "it on a real job",
    )


class JobSpec(_Strict):
    """A federated fine-tuning job: what to train, on which data, how, for how long.

    Besides each field's own constraints: clients_per_round <= num_clients; the model and the
    data set have the same task (a sequence classifier on a classification set, a causal LM on a
    text set); fwd.perturbations_per_task <= fwd.max_perturbations_per_step;
    fwd.perturbations_per_local_step <= fwd.max_perturbations_per_local_step; fwd.upload `pool` needs
    fwd.regime `local`; partition `natural`
    needs a data set with natural groups; devices.profiles, when given, lists num_clients profiles;
    aggregation.strategy `krum` needs clients_per_round > 2 x aggregation.robust.byzantine + 2 and
    krum_selected <= clients_per_round - byzantine; `trimmed_mean` must trim at least one client per
    side; robust strategies need deltas (not fwd.regime `fedsgd`); simulation.poison needs mode
    backprop or align.
    privacy needs aggregation strategy fedavg with weighting uniform, not fwd with regime fedsgd, and
    privacy.noise `client` needs mode backprop or align. clients_per_task > 1 needs pool clients and no
    secure_aggregation.
    """

    name: str = Field(
        "job", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$", description="a label; job ids start with it"
    )
    model: ModelName = Field(
        "minilm-l6",
        description="frozen base model: a packaged model's name, or a local Hugging Face folder (a sequence "
        "classifier or a causal LM, safetensors weights; LoRA targets from peft's default for its architecture "
        "unless lora.target_modules names them)",
    )
    dataset: DatasetChoice = Field(
        "bbc-news", description="data set the clients' shards are drawn from: a packaged set's name or a local source"
    )
    mode: ModeName = Field(
        "backprop", description="training mode: backprop (local AdamW/SGD steps) or fwd (forward gradients, FwdLLM)"
    )
    partition: PartitionSpec = Field(PartitionSpec(), description="how the data set is split among the clients")
    num_clients: int = Field(
        8, ge=1, le=10_000, description="clients in the federation (for bound clients: the number of clients.ids)"
    )
    clients: ClientsSpec = Field(
        ClientsSpec(), description="pool clients (shards of `dataset`) or bound clients (their own workers and data)"
    )
    clients_per_round: int = Field(
        8,
        ge=1,
        le=10_000,
        description="clients sampled each round; at most num_clients (a 422 otherwise); bound clients: all of them "
        "unless given",
    )
    clients_per_task: int = Field(
        1,
        ge=1,
        le=1000,
        description="pool clients packed into one worker task: a worker trains them one after another from one "
        "fetch of the global state, each with its own update, exactly as separate tasks would (the committed "
        "state is the same); for many clients of a few examples each (FwdLLM's regime), where one task per "
        "client spends more on messaging and setup than on compute. Not with bound clients or secure_aggregation",
    )
    rounds: int = Field(5, ge=1, le=10_000, description="federated rounds")
    local_steps: int = Field(10, ge=1, le=100_000, description="backprop: local optimizer steps per task")
    batch_size: int = Field(16, ge=1, le=4096, description="examples per local step")
    max_length: int = Field(128, ge=8, le=4096, description="tokens per example")
    optimizer: OptimizerSpec = Field(OptimizerSpec(), description="the client's local optimizer")
    fwd: ForwardSpec = Field(ForwardSpec(), description="forward-gradient settings (mode fwd)")
    lora: LoraSpec = Field(LoraSpec(), description="the LoRA adapter trained on the frozen base")
    aggregation: AggregationSpec = Field(AggregationSpec(), description="server-side merging")
    personalization: PersonalizationSpec = Field(
        PersonalizationSpec(), description="global partial aggregation and per-client evaluation"
    )
    compression: CompressionSpec = Field(CompressionSpec(), description="update encoding")
    devices: DevicesSpec = Field(DevicesSpec(), description="the simulated wireless device population")
    budget: BudgetSpec = Field(BudgetSpec(), description="per-device compute budgets and client selection")
    seed: int = Field(0, ge=0, lt=2**31, description="seeds shards, sampling, initial weights and perturbations")
    round_deadline_s: float = Field(
        900.0, gt=0, le=7 * 86_400, description="a round closes at this age if the quorum is in (at most a week)"
    )
    quorum: float = Field(1.0, gt=0, le=1, description="fraction of the round's clients needed at the deadline")
    eval_max_examples: int = Field(512, ge=1, le=100_000, description="cap on held-out examples evaluated per round")
    align: AlignSpec = Field(AlignSpec(), description="rewards, preferences and the alignment loss (mode align)")
    secure_aggregation: SecureAggregationSpec = Field(
        SecureAggregationSpec(), description="secure aggregation: the server learns only the sum of the updates"
    )
    resources: ResourcesSpec | None = Field(
        None, description="run this job on its own worker pool with these resources (None: the shared workers)"
    )
    simulation: SimulationSpec = Field(
        SimulationSpec(), description="TEST/BENCHMARK SIMULATION ONLY: injected faults (poisoned clients)"
    )
    privacy: PrivacySpec | None = Field(
        None, description="client-level differential privacy: clipping, Gaussian noise, epsilon (None: off)"
    )

    @model_validator(mode="before")
    @classmethod
    def _num_clients_of_bound(cls, data: Any) -> Any:
        # A bound job's clients are its ids: num_clients follows from them unless the spec says it too, and
        # by default every data owner takes part in every round.
        if isinstance(data, dict):
            clients = data.get("clients")
            ids = clients.get("ids") if isinstance(clients, dict) else getattr(clients, "ids", None)
            if isinstance(ids, list) and ids:
                return {"num_clients": len(ids), "clients_per_round": len(ids), **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.clients.ids is not None and len(self.clients.ids) != self.num_clients:
            raise ValueError(f"clients.ids lists {len(self.clients.ids)} clients but num_clients is {self.num_clients}")
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) exceeds num_clients ({self.num_clients})")
        task = model_info(self.model).task
        if self.mode == "align":
            _check_alignment(self)
        elif task != _data_shape(self.dataset)[0]:
            kind = "a causal LM" if task == "causal-lm" else "a sequence classifier"
            data = self.dataset.path if isinstance(self.dataset, LocalData) else self.dataset
            raise ValueError(f"model {self.model!r} is {kind} and cannot train on dataset {data!r}")
        if self.fwd.perturbations_per_task > self.fwd.max_perturbations_per_step:
            raise ValueError("fwd.perturbations_per_task exceeds fwd.max_perturbations_per_step")
        if self.fwd.upload == "pool" and self.fwd.regime != "local":
            raise ValueError("fwd.upload 'pool' needs fwd.regime 'local'")
        if self.fwd.perturbations_per_local_step > self.fwd.max_perturbations_per_local_step:
            raise ValueError("fwd.perturbations_per_local_step exceeds fwd.max_perturbations_per_local_step")
        if self.partition.kind == "natural" and not _data_shape(self.dataset)[1]:
            raise ValueError(
                "partition 'natural' needs a data set with natural groups (a local source's group_field), "
                f"not {self.dataset!r}"
            )
        if (
            is_model_folder_ref(self.model)
            and not self.lora.full
            and not self.lora.target_modules
            and not model_info(self.model).lora_targets
        ):
            raise ValueError(
                f"model {self.model!r}: peft has no default LoRA targets for its architecture; "
                "name them in lora.target_modules"
            )
        if self.lora.full:
            _check_full_finetuning(self)
        if self.secure_aggregation.enabled:
            _check_secure_aggregation(self)
        if self.clients_per_task > 1:
            _check_batched_tasks(self)

        _check_robust(self)
        if self.privacy is not None:
            _check_privacy(self)
        if self.devices.profiles is not None and len(self.devices.profiles) != self.num_clients:
            raise ValueError(
                f"devices.profiles lists {len(self.devices.profiles)} profiles but num_clients is {self.num_clients}"
            )
        return self

    @property
    def quorum_count(self) -> int:
        """Updates needed to close a round at its deadline (at least one)."""
        return self.quorum_count_of(self.clients_per_round)

    def quorum_count_of(self, expected: int) -> int:
        """The quorum when `expected` updates were asked for (fwd rounds may ask for more waves)."""
        return max(1, math.ceil(self.quorum * expected - 1e-9))


def _data_shape(ref: str | LocalData) -> tuple[str, bool]:
    """(task, has natural groups) of a data set, without reading a local source's records."""
    if isinstance(ref, LocalData):
        return ref.task, ref.group_field is not None
    info = dataset_info(ref)
    return info.task, info.natural_groups


def _check_robust(spec: JobSpec) -> None:
    """The robust strategies' parameters against the round's size; poisoning only where it applies."""
    strategy, robust, n = spec.aggregation.strategy, spec.aggregation.robust, spec.clients_per_round
    if strategy != "fedavg" and spec.mode == "fwd" and spec.fwd.regime != "local":
        raise ValueError(
            f"aggregation.strategy {strategy!r} merges deltas; mode fwd with fwd.regime 'fedsgd' merges "
            "gradient coefficients (use fwd.regime 'local', or strategy 'fedavg')"
        )
    if strategy == "krum":
        if n <= 2 * robust.byzantine + 2:
            raise ValueError(
                f"aggregation.robust.byzantine: Krum needs clients_per_round > 2 x byzantine + 2; with "
                f"{n} clients per round byzantine can be at most {max(0, (n - 3) // 2)}, not {robust.byzantine}"
                if n >= 3
                else f"aggregation.strategy 'krum' needs at least 3 clients per round, not {n}"
            )
        if robust.krum_selected > n - robust.byzantine:
            raise ValueError(
                f"aggregation.robust.krum_selected ({robust.krum_selected}) exceeds clients_per_round - byzantine "
                f"({n - robust.byzantine})"
            )
    if strategy == "trimmed_mean" and int(robust.trim_fraction * n + 1e-9) < 1:
        raise ValueError(
            f"aggregation.robust.trim_fraction {robust.trim_fraction:g} of {n} clients per round trims none; "
            f"use at least {1 / n:.3g} (or strategy 'fedavg')"
        )
    if spec.simulation.poison.fraction > 0 and spec.mode not in ("backprop", "align"):
        raise ValueError("simulation.poison applies to delta uploads: modes backprop and align")


def _check_alignment(spec: JobSpec) -> None:
    if model_info(spec.model).task != "causal-lm":
        raise ValueError(
            f"mode 'align' samples responses from a causal LM; model {spec.model!r} is a sequence classifier"
        )
    align = spec.align
    names = [reward.name for reward in align.rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"align.rewards: names must be unique, got {names}")
    prefs = align.preferences
    if prefs.kind == "explicit":
        if prefs.weights is None:
            raise ValueError("align.preferences.weights: explicit preferences need every client's weights")
        missing = sorted(set(range(spec.num_clients)) - set(prefs.weights))
        extra = sorted(set(prefs.weights) - set(range(spec.num_clients)))
        if missing or extra:
            raise ValueError(f"align.preferences.weights: missing clients {missing[:5]}, unknown clients {extra[:5]}")
        listed = {f"weights.{c}": w for c, w in prefs.weights.items()}
    elif prefs.kind == "groups":
        listed = {f"groups.{i}": w for i, w in enumerate(prefs.groups)}
    else:
        listed = {}
    for where, weights in listed.items():
        if len(weights) != len(align.rewards):
            raise ValueError(
                f"align.preferences.{where}: {len(weights)} weights for {len(align.rewards)} rewards {names}"
            )
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"align.preferences.{where}: weights must be non-negative, got {weights}")
        if abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"align.preferences.{where}: weights must sum to 1, got {sum(weights):g}")


def _check_secure_aggregation(spec: JobSpec) -> None:
    if spec.mode != "backprop":
        raise ValueError(f"secure_aggregation masks backprop deltas; mode {spec.mode!r} is not supported")
    if spec.aggregation.strategy not in SUMMING_STRATEGIES:
        raise ValueError(
            f"secure_aggregation hides individual updates, but aggregation.strategy {spec.aggregation.strategy!r} "
            f"needs them; use one of {', '.join(sorted(SUMMING_STRATEGIES))}"
        )
    if spec.clients_per_round < 2:
        raise ValueError("secure_aggregation needs clients_per_round >= 2 (the sum of one update is that update)")


def _check_batched_tasks(spec: JobSpec) -> None:
    if spec.clients.kind == "bound":
        raise ValueError(
            f"clients_per_task {spec.clients_per_task} batches pool clients only: a bound client's task goes to its "
            "own queue, signed for it alone, so bound clients take clients_per_task 1"
        )
    if spec.secure_aggregation.enabled:
        raise ValueError(
            f"clients_per_task {spec.clients_per_task} is not supported with secure_aggregation: its masked waves "
            "run one task per client; use clients_per_task 1"
        )


def _check_privacy(spec: JobSpec) -> None:
    # DP-FedAvg's sensitivity bound needs every client to weigh alike and the sum to be a plain sum.
    if spec.aggregation.strategy != "fedavg":
        raise ValueError(f"privacy needs aggregation.strategy 'fedavg', not {spec.aggregation.strategy!r}")
    if spec.aggregation.weighting != "uniform":
        raise ValueError("privacy needs aggregation.weighting 'uniform': a client's weight must not depend on its data")
    if spec.mode == "fwd" and spec.fwd.regime != "local":
        raise ValueError("privacy clips each client's delta; fwd regime 'fedsgd' uploads gradient estimates")
    assert spec.privacy is not None
    if spec.secure_aggregation.enabled and spec.privacy.noise == "server":
        raise ValueError(
            "privacy.noise 'server' needs each update in the clear to clip it; with secure_aggregation use "
            "privacy.noise 'client'"
        )
    if spec.privacy.noise == "client" and spec.mode not in ("backprop", "align"):
        raise ValueError(
            f"privacy.noise 'client' needs mode backprop or align (dense delta uploads), not {spec.mode!r}"
        )


FULL_FINETUNING_MAX_STATE_BYTES = 512 * 1024 * 1024
"""The bound a worker and the aggregator put on a decoded state (PWFF_MAX_UPDATE_BYTES, and the
worker's own default when it reads the global state): a full fine-tuning job stores every weight."""


def _check_full_finetuning(spec: JobSpec) -> None:
    if spec.mode != "backprop":
        raise ValueError(f"lora.full trains every base weight with backprop; mode {spec.mode!r} is not supported")
    if PRESETS[spec.personalization.preset].needs_lora:
        raise ValueError(
            f"lora.full trains no LoRA, so personalization.preset {spec.personalization.preset!r} "
            "has nothing to keep personal; use none or head"
        )
    state_bytes = 4 * model_info(spec.model).num_params
    if state_bytes > FULL_FINETUNING_MAX_STATE_BYTES:
        raise ValueError(
            f"lora.full: the float32 weights of {spec.model!r} ({state_bytes / 2**20:.0f} MiB) exceed the "
            f"{FULL_FINETUNING_MAX_STATE_BYTES // 2**20} MiB bound on a stored state"
        )


class SpecError(ValueError):
    """A spec that cannot become a job; the message names the offending field."""


def plain_message(message: str) -> str:
    """A validator's message in plain words: without pydantic's "Value error, " / "Assertion failed, " prefix."""
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """The field names the spec allows at `loc` (the path of the mapping that holds an unknown key)."""
    model: Any = JobSpec
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        # A nested section, possibly optional or a union with a name (dataset): the model among its arguments.
        pending: list[Any] = [model.model_fields[part].annotation]
        model = None
        while pending and model is None:
            candidate = pending.pop()
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
            else:
                pending.extend(get_args(candidate))
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def did_you_mean(loc: tuple[int | str, ...]) -> str:
    """ " (did you mean X?)" for an unknown key close to a known one at the same place, else ""."""
    import difflib

    if not loc:
        return ""
    matches = difflib.get_close_matches(str(loc[-1]), _fields_at(loc[:-1]), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        loc = tuple(item["loc"])
        # A union (dataset: a name or a local source) reports each branch; name the branch in words.
        loc = tuple(p for p in loc if p not in (_NAME_TAG, _LOCAL_TAG))
        where = ".".join(str(p) for p in loc)
        if item["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown field{did_you_mean(loc)}")
        else:
            # A rule between fields has no single place: its message names the fields itself.
            parts.append(f"{where}: {plain_message(item['msg'])}" if where else plain_message(item["msg"]))
    return "; ".join(parts)


def parse_spec(data: Any) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(format_validation_error(error)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides with dotted keys for nested fields; values parse as YAML scalars."""
    result: dict[str, Any] = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"override {item!r}: expected key=value")
        node = result
        path = key.split(".")
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        try:
            node[path[-1]] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as error:  # e.g. `--set name=[` or a control character
            raise SpecError(f"override {item!r}: not a YAML value: {error}".replace("\n", " ")) from None
    return result


def load_spec_file(path: str, overrides: list[str] | None = None) -> JobSpec:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as error:
        raise SpecError(f"cannot read spec {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"spec {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec {path}: expected a mapping at the top level")
    return parse_spec(apply_overrides(data, overrides or []))
