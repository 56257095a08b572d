"""pwff's own sentiment reward model: MiniLM-L6 fine-tuned on tweets-sentiment, written as an HF folder.

`pwff train-reward` calls `train_sentiment`; the `positivity` reward calls `ensure_positivity`, which
trains the folder once into the cache when it is missing. Training is deterministic for a seed and a
thread count: the head is drawn from a seeded generator, the minibatch order from another, and dropout
is off (so nothing draws from torch's process-wide generator, which other worker threads share).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from shared.catalog import DATASETS
from shared.data import Example, load
from shared.models import minilm_dir
from shared.rewards import TRAIN_STEPS

log = logging.getLogger(__name__)

DATASET = "tweets-sentiment"
LABELS: tuple[str, ...] = DATASETS[DATASET].label_names  # negative, neutral, positive
DEFAULT_STEPS = TRAIN_STEPS
DEFAULT_SEED = 0
BATCH_SIZE = 32
LEARNING_RATE = 2e-4
MAX_LENGTH = 64  # tweets average 16 words: 64 tokens keep nearly all of them
METADATA = "pwff_reward.json"
"""Written beside config.json: how the folder was trained and its held-out accuracy."""

Progress = Callable[[int, int, float], None]
"""progress(step, steps, loss), called after every optimizer step."""


@dataclass(frozen=True)
class TrainResult:
    path: str
    steps: int
    seed: int
    accuracy: float
    eval_examples: int
    train_seconds: float
    eval_seconds: float


def positivity_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "rewards" / "positivity"


def _batches(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], size: int
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    out = []
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        encoded = tokenizer(
            [e.text for e in chunk], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        out.append((dict(encoded), torch.tensor([e.label for e in chunk])))
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int = 128
) -> float:
    model.eval()
    correct = 0
    by_length = sorted(examples, key=lambda e: len(e.text))  # batches of similar lengths pad little
    for inputs, labels in _batches(tokenizer, by_length, batch_size):
        correct += int((model(**inputs).logits.argmax(-1) == labels).sum())
    return correct / max(1, len(examples))


def _eval_subset(examples: Sequence[Example], limit: int | None) -> Sequence[Example]:
    if limit is None or limit >= len(examples):
        return examples
    stride = len(examples) / limit  # an even spread over the (hash-ordered) test split, not its first rows
    return [examples[int(i * stride)] for i in range(limit)]


def train_sentiment(
    out: Path,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    eval_examples: int | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Fine-tune MiniLM-L6's transformer layers and a new 3-class head (embeddings frozen) for `steps`
    AdamW steps of 32 tweets, then write an HF folder to `out` (atomically: a staging folder beside it
    is renamed into place; an existing `out` is replaced). `eval_examples` caps the held-out examples
    scored (None: all 7,449)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    out = Path(out)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(),
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the head from the seed, whatever from_pretrained drew it from
        for name, param in model.named_parameters():
            if name.startswith("classifier."):
                if name.endswith("bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)

    # The word embeddings are half of MiniLM's weights: frozen, a step costs less and tweets' rare
    # words cannot be overfitted; the six transformer layers and the head are trained.
    for param in model.base_model.embeddings.parameters():
        param.requires_grad_(False)

    train = load(DATASET, "train")
    order: list[int] = []
    while len(order) < steps * BATCH_SIZE:  # epochs of fresh permutations, as many as the steps need
        order += torch.randperm(len(train), generator=generator).tolist()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.01
    )
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))),
    )
    model.train()
    for step in range(steps):
        chunk = [train[i] for i in order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]]
        ((inputs, labels),) = _batches(tokenizer, chunk, BATCH_SIZE)
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, steps, loss.item())
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    test = _eval_subset(load(DATASET, "test"), eval_examples)
    accuracy = evaluate(model, tokenizer, test)
    eval_seconds = time.perf_counter() - started

    # Inference folders keep BERT's usual dropout settings (eval mode ignores them anyway).
    model.config.hidden_dropout_prob = 0.1
    model.config.attention_probs_dropout_prob = 0.1
    result = TrainResult(str(out), steps, seed, accuracy, len(test), train_seconds, eval_seconds)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / METADATA).write_text(json.dumps({**asdict(result), "dataset": DATASET, "labels": LABELS}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


_ensure_lock = threading.Lock()


def ensure_positivity(
    cache_dir: Path, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED, eval_examples: int = 1000
) -> Path:
    """The `positivity` reward's folder, trained into the cache once if missing.

    A lock file serializes concurrent workers (processes, and threads of one process): the first trains,
    the others wait and then find the finished folder. The rename is atomic, so a folder with a
    config.json is always complete.
    """
    target = positivity_dir(cache_dir)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _ensure_lock, open(target.parent / ".positivity.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / "config.json").exists():
                log.info("training the positivity reward model into %s (once, ~2 min)", target)
                result = train_sentiment(target, steps=steps, seed=seed, eval_examples=eval_examples)
                log.info("positivity reward model: held-out accuracy %.3f", result.accuracy)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target
