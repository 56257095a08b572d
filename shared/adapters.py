"""A job's model: the frozen base with the LoRA (and adapters) its spec and preset ask for.

With `lora.full` (full fine-tuning) it is the base model itself with every weight trainable
instead; the services exchange its whole trainable state just as they exchange a LoRA's.

Composes the base-model loaders (`shared.models`), the personalization preset (which adapter
modules it adds) and the training mode (which attention kernel it needs); keeps the last
loaded model so consecutive tasks of similar jobs reuse the frozen base.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedTokenizerBase

from shared.catalog import dataset_info, model_info
from shared.models import GLOBAL_RNG_LOCK, device, keep_base_weights, load_base_model, load_tokenizer
from shared.personalization import preset_of
from shared.registry import MODES
from shared.spec import JobSpec


def lora_config(spec: JobSpec) -> LoraConfig:
    info = model_info(spec.model)
    classification = info.task == "classification"
    targets: list[str] | str = list(spec.lora.target_modules or info.lora_targets)
    extra = preset_of(spec).extra_adapters(spec)
    if extra:
        # One regex for peft (full match): the attention LoRA targets, plus the preset's adapters.
        targets = "|".join([*(rf".*\.{t}" for t in targets), *extra])
    return LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=targets,
        rank_pattern=extra,
        task_type="SEQ_CLS" if classification else "CAUSAL_LM",
        modules_to_save=["classifier"] if classification and spec.lora.train_head else None,
        base_model_name_or_path=info.hub_id,
    )


def attention_for(spec: JobSpec) -> str | None:
    return MODES[spec.mode].attention_implementation(spec)


def peft_cache_key(spec: JobSpec) -> str:
    """Specs with the same key can share one loaded PEFT model (only the trainable state differs)."""
    return json.dumps(
        {
            "model": spec.model,
            "labels": dataset_info(spec.dataset).num_labels,
            "lora": spec.lora.model_dump(),
            "adapters": preset_of(spec).extra_adapters(spec),
            "attention": attention_for(spec),
        },
        sort_keys=True,
    )


def build_peft_model(spec: JobSpec, cache_dir: Path) -> PeftModel:
    """Frozen base model + LoRA (and a trainable head for classifiers)."""
    with GLOBAL_RNG_LOCK:
        base = load_base_model(spec.model, dataset_info(spec.dataset).num_labels, cache_dir, attention_for(spec))
        for param in base.parameters():
            param.requires_grad_(False)
        # peft writes the base's name into adapter_config.json: make it one a user can load elsewhere.
        base.name_or_path = model_info(spec.model).hub_id
        return get_peft_model(base, lora_config(spec))


def build_full_model(spec: JobSpec, cache_dir: Path) -> torch.nn.Module:
    """Full fine-tuning (`lora.full`): the base model with every parameter trainable.

    The pretrained weights are kept beside it (`shared.models.keep_base_weights`): they are the
    job's initial state, whatever a cached copy of the model was trained to since.
    """
    with GLOBAL_RNG_LOCK:
        base = load_base_model(spec.model, dataset_info(spec.dataset).num_labels, cache_dir, attention_for(spec))
        for param in base.parameters():
            param.requires_grad_(True)
        base.name_or_path = model_info(spec.model).hub_id
        keep_base_weights(base)
        return base


def build_model(spec: JobSpec, cache_dir: Path) -> torch.nn.Module:
    """The job's trainable model: a PEFT model over the frozen base, or the whole base (`lora.full`)."""
    return build_full_model(spec, cache_dir) if spec.lora.full else build_peft_model(spec, cache_dir)


class ModelCache:
    """Keeps the last loaded job model: consecutive tasks of similar jobs reuse the frozen base."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._key: str | None = None
        self._model: torch.nn.Module | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._lock = threading.Lock()

    def get(self, spec: JobSpec) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        key = peft_cache_key(spec)
        with self._lock:
            if self._key != key or self._model is None or self._tokenizer is None:
                self._model = self._tokenizer = None  # free the previous model first
                self._model = build_model(spec, self.cache_dir).to(device())
                self._tokenizer = load_tokenizer(spec.model, self.cache_dir)
                self._key = key
            return self._model, self._tokenizer
