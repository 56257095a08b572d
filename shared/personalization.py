"""Global partial aggregation: which trainable tensors are shared and which stay with each client.

Only global tensors are uploaded and averaged. A client's personal tensors are kept per
client in the store, handed to whichever worker trains that client next, and never sent to
the aggregator.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch

from shared.models import model_info
from shared.spec import JobSpec

# The pwff preset's shared adapter: a low-rank parallel adapter on each block's feed-forward
# output projection (written as a LoRA so the whole model stays one PEFT folder).
_ADAPTER_TARGETS = {
    "classification": r".*\.layer\.\d+\.output\.dense",
    "causal-lm": r".*\.down_proj",
}


def adapter_pattern(spec: JobSpec) -> str:
    return _ADAPTER_TARGETS[model_info(spec.model).task]


def attention_targets(spec: JobSpec) -> tuple[str, ...]:
    return tuple(spec.lora.target_modules or model_info(spec.model).lora_targets)


def is_personal(spec: JobSpec, name: str) -> bool:
    preset = spec.personalization.preset
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in spec.personalization.personal):
        return True
    if preset == "pwff":
        return "lora_" in name and any(f".{target}." in name for target in attention_targets(spec))
    if preset == "fedsa":
        return "lora_B" in name
    if preset == "head":
        return "modules_to_save" in name
    return False


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
