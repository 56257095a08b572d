"""Reward models for `mode: align`, scored in the worker where the client's prompts are.

Kinds (`shared.registry.REWARDS`, named by `RewardSpec.kind`), each score higher-is-better, roughly in [0, 1]:

- `relevance`: cosine similarity of the MiniLM-L6 (all-MiniLM-L6-v2) mean-pooled sentence embeddings of
  prompt and response, kept as the raw cosine (in [-1, 1]; in practice about 0-0.2 for unrelated text,
  0.4-0.8 for an on-topic reply). The prompt is what the align mode passes, so pass the message itself
  rather than the templated user turn, or the template's words count as topic.
- `positivity`: pwff's own sentiment classifier (MiniLM-L6 fine-tuned on tweets-sentiment by
  `pwff train-reward`), loaded through the generic HF path from `<cache>/rewards/positivity` (trained
  there once if missing); score = P(positive) + 0.5 P(neutral) of the response.
- `harmlessness`: 1 - P(offensive) of the response, from `alt-profanity-check` (a linear SVM over
  character/word n-grams trained on offensive-language data sets).
- `conciseness`: 1 when the response has at most `target_words` words, exp(-(words - target) / target)
  above (0.37 at twice the target).
- `keyword`: the share of the response's words (split on whitespace, punctuation stripped, case-folded)
  equal to `keyword`; 0 for an empty response.
- `hf`: any Hugging Face sequence-classification folder (`path`); the softmax probability of `label`
  (an index or a name from config.json's id2label; default the last label) for the response.

This module imports no torch at load time: `check_reward_folder` serves the spec's validation.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.rewards.base import RewardError, RewardKind, RewardModel

if TYPE_CHECKING:
    import torch

    from shared.spec import RewardSpec

__all__ = ["RewardCache", "RewardError", "RewardKind", "RewardModel", "check_reward_folder"]

TRAIN_STEPS = 150
"""`pwff train-reward`'s default AdamW steps (and the positivity reward's when it trains its folder)."""
TRAIN_EVAL_EXAMPLES = 2000
"""Held-out tweets `pwff train-reward` scores by default, spread evenly over the 7,449 of the test split."""

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _read_config(path: Path, where: str) -> dict[str, Any]:
    if not path.exists():
        raise RewardError(f"{where}: no such folder {str(path)!r}")
    if not path.is_dir():
        raise RewardError(f"{where}: {str(path)!r} is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RewardError(f"{where}: {str(path)!r} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise RewardError(f"{where}: cannot read {config_file}: {error}") from None
    if not isinstance(config, dict):
        raise RewardError(f"{where}: {config_file} is not a JSON object")
    return config


def read_labels(path: Path, config: dict[str, Any] | None = None) -> list[str]:
    """A classifier folder's label names by index, from config.json (id2label, else LABEL_i for num_labels)."""
    config = config if config is not None else _read_config(Path(path), str(path))
    id2label = config.get("id2label") or {}
    try:
        by_index = {int(key): str(value) for key, value in id2label.items()}
    except (AttributeError, ValueError):
        by_index = {}
    count = len(by_index) or int(config.get("num_labels") or 2)
    return [by_index.get(i, f"LABEL_{i}") for i in range(count)]


def resolve_label(labels: Sequence[str], label: int | str | None, where: str) -> int:
    """The index of `label` among a classifier's labels: an index, a name (exact, else case-insensitive),
    None for the last."""
    listed = ", ".join(f"{i} {name!r}" for i, name in enumerate(labels))
    if label is None:
        return len(labels) - 1
    if isinstance(label, bool):
        raise RewardError(f"{where}: label must be an index or a label name, got {label!r}")
    if isinstance(label, int):
        if 0 <= label < len(labels):
            return label
        raise RewardError(f"{where}: label index {label} out of range; the classifier's labels: {listed}")
    if label in labels:
        return list(labels).index(label)
    folded = [i for i, name in enumerate(labels) if name.casefold() == label.casefold()]
    if len(folded) == 1:
        return folded[0]
    raise RewardError(f"{where}: unknown label {label!r}; the classifier's labels: {listed}")


def check_reward_folder(path: str, where: str, label: int | str | None = None) -> None:
    """Raise `RewardError` (a ValueError) "<where>: ..." unless `path` is an HF sequence-classification
    folder (config.json whose architectures name a *ForSequenceClassification, and weights) that has
    `label` (when given). Reads config.json only: no torch, no weights loaded."""
    folder = Path(path).expanduser()
    config = _read_config(folder, where)
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not any(
        isinstance(name, str) and name.endswith("ForSequenceClassification") for name in architectures
    ):
        raise RewardError(
            f"{where}: {path!r} is not a sequence classifier (architectures: {architectures or 'none listed'})"
        )
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise RewardError(f"{where}: {path!r} has no weights ({' or '.join(_WEIGHT_FILES[::2])})")
    if label is not None:
        resolve_label(read_labels(folder, config), label, where)


class RewardCache:
    """The reward models of one worker process: each `RewardSpec` is loaded once, on first use, and kept.

    Thread-safe: concurrent `get`s of one spec load it once (the others wait); different specs load in
    parallel. Models stay on `device` (default: the worker's, `shared.models.device()`).
    """

    def __init__(self, cache_dir: Path, device: torch.device | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self._device = device
        self._models: dict[str, RewardModel] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        if self._device is None:
            from shared.models import device

            self._device = device()
        return self._device

    def get(self, spec: RewardSpec) -> RewardModel:
        key = spec.model_dump_json()
        with self._lock:
            if key in self._models:
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = self._load(spec)
            with self._lock:
                self._models[key] = model
                self._loading.pop(key, None)
            return model

    def _load(self, spec: RewardSpec) -> RewardModel:
        from shared.registry import REWARDS

        if spec.kind not in REWARDS:
            raise RewardError(f"reward {spec.name!r}: unknown reward model {spec.kind!r}; known: {', '.join(REWARDS)}")
        try:
            return REWARDS[spec.kind].load(spec, self.cache_dir, self.device)
        except RewardError:
            raise
        except (OSError, ValueError) as error:
            raise RewardError(f"reward {spec.name!r} ({spec.kind}): cannot load: {error}") from error

    def score(self, specs: Sequence[RewardSpec], prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """float32 [n, len(specs)] on the CPU: column j is reward j's score of each (prompt, response).

        Raises `RewardError` naming the reward when it returns the wrong shape or a non-finite score.
        """
        import torch

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        columns = []
        for spec in specs:
            scores = self.get(spec).score(prompts, responses)
            scores = scores.detach().to("cpu", torch.float32).reshape(-1)
            if scores.numel() != len(responses):
                raise RewardError(f"reward {spec.name!r} ({spec.kind}): {scores.numel()} scores for {len(responses)}")
            bad = (~torch.isfinite(scores)).nonzero().flatten()
            if bad.numel():
                i = int(bad[0])
                raise RewardError(
                    f"reward {spec.name!r} ({spec.kind}) returned a non-finite score ({float(scores[i])}) for "
                    f"{bad.numel()} of {len(responses)} responses, first response {i}: {responses[i][:80]!r}"
                )
            columns.append(scores)
        if not columns:
            return torch.zeros(len(responses), 0)
        return torch.stack(columns, dim=1)
