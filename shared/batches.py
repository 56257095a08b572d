"""Turning examples into model inputs, identically in the worker and the aggregator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from shared.data import Example

Task = Literal["classification", "causal-lm"]


def collate(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    task: Task,
    max_length: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    encoded = tokenizer(
        [example.text for example in examples],
        truncation=True,
        max_length=max_length,
        padding="longest",
        return_tensors="pt",
    )
    batch = {
        key: value.to(device)
        for key, value in encoded.items()
        if key in ("input_ids", "attention_mask", "token_type_ids")
    }
    if task == "classification":
        batch["labels"] = torch.tensor([example.label for example in examples], dtype=torch.long, device=device)
    else:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100  # padding is not a prediction target
        batch["labels"] = labels
    return batch
