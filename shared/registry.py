"""Named plugins: training modes, personalization presets, aggregation strategies.

Each registry maps the name a job spec uses to the class that implements it, written as
"module:Class" and imported on first use. The spec validates names against these tables
without importing torch (the CLI and the API stay light), and the services look the class
up here instead of branching on the name. Adding a plugin is one module and one line below.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only name -> instance map whose classes are imported lazily, each instantiated once."""

    def __init__(self, what: str, entries: Mapping[str, str]) -> None:
        self.what = what
        self._entries = dict(entries)
        self._loaded: dict[str, T] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.what} {name!r}; known: {', '.join(self._entries)}")
        with self._lock:
            if name not in self._loaded:
                module_name, _, class_name = self._entries[name].partition(":")
                plugin: Any = getattr(importlib.import_module(module_name), class_name)
                self._loaded[name] = plugin()
            return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        # Mapping's default would import the plugin: checking a spec's names must stay torch-free.
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)


if TYPE_CHECKING:  # the plugin modules import torch: only type checkers read them here
    from shared.aggregation import AggregationStrategy
    from shared.modes.base import TrainingMode
    from shared.personalization import PersonalizationPreset
    from shared.rewards.base import RewardKind

MODES: Registry[TrainingMode] = Registry(
    "training mode",
    {
        "backprop": "shared.modes.backprop:BackpropMode",
        "fwd": "shared.modes.fwd:ForwardMode",
        "auto": "shared.modes.auto:AutoMode",
        "align": "shared.modes.align:AlignMode",
    },
)
PRESETS: Registry[PersonalizationPreset] = Registry(
    "personalization preset",
    {
        "none": "shared.personalization:NoPersonalization",
        "pwff": "shared.personalization:PwffPreset",
        "fedsa": "shared.personalization:FedSAPreset",
        "head": "shared.personalization:PersonalHead",
    },
)
STRATEGIES: Registry[AggregationStrategy] = Registry(
    "aggregation strategy",
    {
        "fedavg": "shared.aggregation:FedAvg",
        "clip": "shared.robust:Clip",
        "median": "shared.robust:Median",
        "trimmed_mean": "shared.robust:TrimmedMean",
        "krum": "shared.robust:Krum",
    },
)
REWARDS: Registry[RewardKind] = Registry(
    "reward model",
    {
        "relevance": "shared.rewards.builtin:Relevance",
        "positivity": "shared.rewards.builtin:Positivity",
        "harmlessness": "shared.rewards.builtin:Harmlessness",
        "conciseness": "shared.rewards.builtin:Conciseness",
        "keyword": "shared.rewards.builtin:Keyword",
        "hf": "shared.rewards.hf:HuggingFaceClassifier",
    },
)
