"""Global partial aggregation: which trainable tensors are shared and which stay with each client.

Only global tensors are uploaded and averaged. A client's personal tensors are kept per
client in the store, handed to whichever worker trains that client next, and never sent to
the aggregator. A preset is a small class registered by name in `shared.registry.PRESETS`;
the spec's `personalization.personal` glob patterns add to whatever the preset keeps personal.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar

from shared.catalog import model_info
from shared.registry import PRESETS

if TYPE_CHECKING:
    import torch

    from shared.spec import JobSpec


class PersonalizationPreset(ABC):
    """Which trainable tensors a client keeps to itself, and which adapter modules the preset adds."""

    personalizes: ClassVar[bool] = True
    """Whether clients end with models of their own (then they are evaluated every round by default)."""
    needs_lora: ClassVar[bool] = False
    """Whether what it keeps personal is LoRA tensors (then full fine-tuning, `lora.full`, cannot use it)."""

    @abstractmethod
    def keeps_personal(self, spec: JobSpec, name: str) -> bool:
        """Whether the trainable tensor `name` stays with its client (never uploaded nor averaged)."""

    def extra_adapters(self, spec: JobSpec) -> dict[str, int]:
        """Extra LoRA target modules the preset adds: a regex over module names (full match) -> rank."""
        return {}


class NoPersonalization(PersonalizationPreset):
    """Everything global: plain FedAvg."""

    personalizes = False

    def keeps_personal(self, spec: JobSpec, name: str) -> bool:
        return False


# The shared adapter: a low-rank parallel adapter on each block's feed-forward output projection
# (written as a LoRA so the whole model stays one PEFT folder).
_ADAPTER_TARGETS = {
    "classification": r".*\.layer\.\d+\.output\.dense",
    "causal-lm": r".*\.down_proj",
}


class PwffPreset(PersonalizationPreset):
    """PWFF: the shared feed-forward adapter is aggregated; the attention LoRA stays personal."""

    needs_lora = True

    def keeps_personal(self, spec: JobSpec, name: str) -> bool:
        return "lora_" in name and any(f".{target}." in name for target in attention_targets(spec))

    def extra_adapters(self, spec: JobSpec) -> dict[str, int]:
        return {_ADAPTER_TARGETS[model_info(spec.model).task]: spec.personalization.adapter_r}


class FedSAPreset(PersonalizationPreset):
    """FedSA-LoRA: LoRA A is global (general knowledge), LoRA B personal (client specifics)."""

    needs_lora = True

    def keeps_personal(self, spec: JobSpec, name: str) -> bool:
        return "lora_B" in name


class PersonalHead(PersonalizationPreset):
    """The classifier head stays personal; the LoRA (with `lora.full`: the whole body) is averaged (FedPer-style)."""

    def keeps_personal(self, spec: JobSpec, name: str) -> bool:
        if spec.lora.full:
            return name.startswith("classifier.")
        return "modules_to_save" in name


def preset_of(spec: JobSpec) -> PersonalizationPreset:
    return PRESETS[spec.personalization.preset]


def attention_targets(spec: JobSpec) -> tuple[str, ...]:
    return tuple(spec.lora.target_modules or model_info(spec.model).lora_targets)


def is_personal(spec: JobSpec, name: str) -> bool:
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in spec.personalization.personal):
        return True
    return preset_of(spec).keeps_personal(spec, name)


def personal_names(spec: JobSpec, names: Iterable[str]) -> set[str]:
    return {name for name in names if is_personal(spec, name)}


def split_state(
    spec: JobSpec, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(global part, personal part) of a trainable state."""
    shared: dict[str, torch.Tensor] = {}
    personal: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        (personal if is_personal(spec, name) else shared)[name] = tensor
    return shared, personal
