"""What a job can name: base models and data sets. Pure data, no heavy imports.

The job spec validates `model` and `dataset` against these tables, and the model and data
loaders (`shared.models`, `shared.data`) read them; adding a model or a data set starts here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Task = Literal["classification", "causal-lm"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: Task
    lora_targets: tuple[str, ...]
    hub_id: str
    """What a user would load as the base model elsewhere; written into adapter_config.json."""
    num_params: int
    """Parameters of the base model: what the scheduler's FLOP estimates scale with before loading it."""
    backprop_mb_per_token: float = 0.0
    """Peak memory of one backprop step (LoRA, AdamW) above the loaded model, per token of the batch:
    measured by bench/memory.py (step alone, batch 8 x 256)."""
    forward_mb_per_token: float = 0.0
    """The same for one forward-gradient (fd) step."""

    def step_memory_mb(self, tokens: int, backprop: bool) -> float:
        """Memory a local step needs: runtime and float32 weights, plus the step's own peak."""
        per_token = self.backprop_mb_per_token if backprop else self.forward_mb_per_token
        return 400.0 + 4 * self.num_params / 1e6 + per_token * tokens


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    task: Task
    label_names: tuple[str, ...]
    natural_groups: bool = False
    """Examples carry a natural group (which novel) that a `natural` partition follows."""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            "minilm-l6",
            "classification",
            ("query", "value"),
            "sentence-transformers/all-MiniLM-L6-v2",
            22_715_141,
            backprop_mb_per_token=680 / 2048,
            forward_mb_per_token=45 / 2048,
        ),
        ModelInfo(
            "smollm2-135m",
            "causal-lm",
            ("q_proj", "v_proj"),
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            134_515_008,
            backprop_mb_per_token=3032 / 2048,
            forward_mb_per_token=68 / 2048,
        ),
        # Tiny test models: figures in the same proportion as MiniLM's, so memory rules can be tested.
        ModelInfo("tiny-bert", "classification", ("query", "value"), "pwff/tiny-bert", 1_011_525, 2.0, 0.1),
        ModelInfo("tiny-llama", "causal-lm", ("q_proj", "v_proj"), "pwff/tiny-llama", 3_166_368, 2.0, 0.1),
    )
}

_BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
# Ordinal order, negative to positive: the usual convention of three-way sentiment models, and it
# keeps "neutral" in the middle for anyone who reads the class index as a score.
_TWEET_CLASSES = ("negative", "neutral", "positive")
# R object name in janeaustenr -> title; indices follow the sorted titles.
AUSTEN_NOVELS = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("bbc-news", "classification", _BBC_CLASSES),
        DatasetInfo("tweets-sentiment", "classification", _TWEET_CLASSES),
        DatasetInfo("jane-austen", "causal-lm", tuple(sorted(AUSTEN_NOVELS.values())), natural_groups=True),
    )
}


def model_info(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None
