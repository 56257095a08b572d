"""Turning examples into model inputs, identically in the worker and the aggregator."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from shared.catalog import Task
from shared.data import Example

T = TypeVar("T")


def minibatches(examples: Sequence[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless shuffled minibatches: a fresh permutation each pass over the client's data."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(examples))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if len(chunk) < min(batch_size, len(order)):
                break  # keep batch shapes constant; the tail joins the next pass
            yield [examples[i] for i in chunk]


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
