"""Held-out evaluation: the aggregator's per-round figures, and what users check adapters with."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from shared.batches import Task, collate
from shared.data import Example


def evaluation_subset(examples: Sequence[Example], limit: int) -> list[Example]:
    """A fixed, seed-independent sample of at most `limit` examples, spread over all labels."""
    if limit >= len(examples):
        return list(examples)
    order = np.random.default_rng(0).permutation(len(examples))[:limit]
    return [examples[i] for i in sorted(order.tolist())]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    task: Task,
    max_length: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """Accuracy and mean loss. For a causal LM: next-token accuracy and per-token loss, plus perplexity."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(tokenizer, examples[start : start + batch_size], task, max_length, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task == "classification":
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum().item())
            count += labels.numel()
        else:
            shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            targets = labels[:, 1:].reshape(-1)
            mask = targets != -100
            loss_sum += torch.nn.functional.cross_entropy(shifted_logits[mask], targets[mask], reduction="sum").item()
            correct += int((shifted_logits[mask].argmax(-1) == targets[mask]).sum().item())
            count += int(mask.sum().item())
    if count == 0:
        return {"accuracy": 0.0, "loss": 0.0}
    result = {"accuracy": correct / count, "loss": loss_sum / count}
    if task == "causal-lm":
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    return result


def predict(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    batch_size: int = 32,
) -> list[int]:
    """Predicted class of each example (sequence classification)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[int] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(tokenizer, examples[start : start + batch_size], "classification", max_length, device)
            batch.pop("labels")
            out.extend(model(**batch).logits.argmax(-1).tolist())
    return out
