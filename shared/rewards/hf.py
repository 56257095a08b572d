"""Any Hugging Face sequence-classification folder as a reward model (`kind: hf`).

The reward is the softmax probability of one label (`label`: an index or a name from the folder's
config `id2label`; default the last label) for the response alone; the prompt is not shown to the
classifier. The same scorer, with weights over several labels, serves `positivity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from shared.rewards import check_reward_folder, read_labels, resolve_label
from shared.rewards.base import RewardError, RewardKind, RewardModel, check_pairs

if TYPE_CHECKING:
    from shared.spec import RewardSpec

MAX_TOKENS = 128
BATCH_SIZE = 64


class ClassifierReward(RewardModel):
    """score = sum over labels of weight[label] * softmax(logits)[label], for each response."""

    def __init__(self, name: str, path: Path, weights: Sequence[float], device: torch.device) -> None:
        super().__init__(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.device = device
        num_labels = int(self.model.config.num_labels)
        if len(weights) != num_labels:
            raise RewardError(f"reward {name!r}: {len(weights)} label weights for {num_labels} labels")
        self.weights = torch.tensor(list(weights), dtype=torch.float32, device=device)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        check_pairs(prompts, responses)
        out = []
        with self.lock:
            for start in range(0, len(responses), BATCH_SIZE):
                encoded = self.tokenizer(
                    list(responses[start : start + BATCH_SIZE]),
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                ).to(self.device)
                probs = torch.softmax(self.model(**encoded).logits.float(), dim=-1)
                out.append((probs @ self.weights).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def classifier_reward(name: str, path: Path, label: int | str | None, device: torch.device, where: str) -> RewardModel:
    check_reward_folder(str(path), where, label=label)
    labels = read_labels(path)
    index = resolve_label(labels, label, where)
    weights = [0.0] * len(labels)
    weights[index] = 1.0
    return ClassifierReward(name, path, weights, device)


class HuggingFaceClassifier(RewardKind):
    def load(self, spec: RewardSpec, cache_dir: Path, device: torch.device) -> RewardModel:
        if not spec.path:
            raise RewardError(f"reward {spec.name!r}: kind 'hf' needs a path to a sequence-classification folder")
        return classifier_reward(spec.name, Path(spec.path), spec.label, device, f"reward {spec.name!r} path")
