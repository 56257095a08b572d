"""The reward-model interface of `mode: align`: a kind loads a model from a `RewardSpec`, the model scores
(prompt, response) pairs. Torch-free at import, so the spec layer can use `RewardError`."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from shared.spec import RewardSpec


class RewardError(ValueError):
    """A reward model cannot be loaded or returned an unusable score; the message names the field or reward."""


class RewardModel(ABC):
    """A loaded reward model. `score` returns float32 [n] on the CPU, higher is better, roughly in [0, 1].

    Models are shared by the worker threads of a process: `score` must be safe to call concurrently
    (the built-ins serialize their forward passes with `self.lock`; fast tokenizers are not re-entrant).
    """

    name: str

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor: ...


class RewardKind(ABC):
    """One `kind` of reward (a `shared.registry.REWARDS` entry), instantiated once per process."""

    @abstractmethod
    def load(self, spec: RewardSpec, cache_dir: Path, device: torch.device) -> RewardModel: ...


def check_pairs(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
