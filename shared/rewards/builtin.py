"""The built-in reward kinds; each runs offline from installed packages (see `shared.rewards` for the scores)."""

from __future__ import annotations

import math
import string
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModel, AutoTokenizer

from shared.models import minilm_dir
from shared.rewards import read_labels
from shared.rewards.base import RewardError, RewardKind, RewardModel, check_pairs
from shared.rewards.hf import BATCH_SIZE, MAX_TOKENS, ClassifierReward

if TYPE_CHECKING:
    from shared.spec import RewardSpec


def words(text: str) -> list[str]:
    """Whitespace-separated words, punctuation stripped from both ends, case-folded; empty ones dropped."""
    stripped = (word.strip(string.punctuation + "“”‘’«»…") for word in text.split())
    return [word.casefold() for word in stripped if word]


# -- relevance -------------------------------------------------------------------------------------


class _Encoder:
    """MiniLM-L6 sentence embeddings (all-MiniLM-L6-v2: mean pooling over tokens, L2-normalized)."""

    def __init__(self, device: torch.device) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        self.model = AutoModel.from_pretrained(minilm_dir()).to(device).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.device = device
        self.lock = threading.Lock()

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), BATCH_SIZE):
            encoded = self.tokenizer(
                list(texts[start : start + BATCH_SIZE]),
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, int(self.model.config.hidden_size))


class RelevanceReward(RewardModel):
    def __init__(self, name: str, encoder: _Encoder) -> None:
        super().__init__(name)
        self.encoder = encoder

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        check_pairs(prompts, responses)
        with self.encoder.lock:
            embedded = self.encoder.encode([*prompts, *responses])
        n = len(prompts)
        return (embedded[:n] * embedded[n:]).sum(-1)


class Relevance(RewardKind):
    """The raw cosine of prompt and response embeddings (not rescaled: see `shared.rewards`)."""

    def __init__(self) -> None:
        self._encoders: dict[str, _Encoder] = {}
        self._lock = threading.Lock()

    def load(self, spec: RewardSpec, cache_dir: Path, device: torch.device) -> RewardModel:
        with self._lock:  # one encoder per device, shared by every relevance reward of the process
            if str(device) not in self._encoders:
                self._encoders[str(device)] = _Encoder(device)
            return RelevanceReward(spec.name, self._encoders[str(device)])


# -- positivity ------------------------------------------------------------------------------------

POSITIVITY_WEIGHTS = {"negative": 0.0, "neutral": 0.5, "positive": 1.0}


class Positivity(RewardKind):
    """P(positive) + 0.5 P(neutral) from pwff's tweets sentiment classifier, through the generic HF scorer."""

    def load(self, spec: RewardSpec, cache_dir: Path, device: torch.device) -> RewardModel:
        from shared.rewards import check_reward_folder
        from shared.rewards.train import ensure_positivity

        path = ensure_positivity(cache_dir)
        where = f"reward {spec.name!r} (positivity, {path})"
        check_reward_folder(str(path), where)
        labels = [label.casefold() for label in read_labels(path)]
        if sorted(labels) != sorted(POSITIVITY_WEIGHTS):
            raise RewardError(f"{where}: expected labels {sorted(POSITIVITY_WEIGHTS)}, the folder has {labels}")
        return ClassifierReward(spec.name, path, [POSITIVITY_WEIGHTS[label] for label in labels], device)


# -- harmlessness ----------------------------------------------------------------------------------


class HarmlessnessReward(RewardModel):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise RewardError(
                f"reward {name!r}: kind 'harmlessness' needs the alt-profanity-check package "
                "(pip install alt-profanity-check)"
            ) from None
        self._predict_prob = predict_prob

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        check_pairs(prompts, responses)
        if not responses:
            return torch.zeros(0)
        with self.lock:
            offensive = self._predict_prob(list(responses))
        return 1.0 - torch.as_tensor(offensive, dtype=torch.float32)


class Harmlessness(RewardKind):
    """1 - P(offensive) from alt-profanity-check's classifier."""

    def load(self, spec: RewardSpec, cache_dir: Path, device: torch.device) -> RewardModel:
        return HarmlessnessReward(spec.name)


# -- conciseness and keyword: plain functions of the response's words --------------------------------


def conciseness(text: str, target_words: int) -> float:
    count = len(words(text))
    return 1.0 if count <= target_words else math.exp(-(count - target_words) / target_words)


def keyword_share(text: str, keyword: str) -> float:
    found = words(text)
    wanted = words(keyword)
    if not found or len(wanted) != 1:
        return 0.0
    return sum(word == wanted[0] for word in found) / len(found)


class ConcisenessReward(RewardModel):
    def __init__(self, name: str, target_words: int) -> None:
        super().__init__(name)
        self.target_words = target_words

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        check_pairs(prompts, responses)
        return torch.tensor([conciseness(r, self.target_words) for r in responses], dtype=torch.float32)


class Conciseness(RewardKind):
    def load(self, spec: RewardSpec, cache_dir: Path, device: torch.device) -> RewardModel:
        return ConcisenessReward(spec.name, spec.target_words)


class KeywordReward(RewardModel):
    def __init__(self, name: str, keyword: str) -> None:
        super().__init__(name)
        self.keyword = keyword

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        check_pairs(prompts, responses)
        return torch.tensor([keyword_share(r, self.keyword) for r in responses], dtype=torch.float32)


class Keyword(RewardKind):
    def load(self, spec: RewardSpec, cache_dir: Path, device: torch.device) -> RewardModel:
        if not spec.keyword or len(words(spec.keyword)) != 1:
            raise RewardError(f"reward {spec.name!r}: kind 'keyword' needs one word as keyword, got {spec.keyword!r}")
        return KeywordReward(spec.name, spec.keyword)
