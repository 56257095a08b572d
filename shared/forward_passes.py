"""Forward passes for forward gradients (FwdLLM): losses and directional derivatives, no autograd graph.

`fd` perturbs the parameters in place by +-h v and runs two inferences under
`torch.no_grad()`; `jvp` gets the exact directional derivative in one pass with
`torch.func.jvp`. Neither keeps an autograd graph. For causal LMs the loss is computed
from the last hidden state in chunks of positions, so the full (batch x tokens x 49k)
logits tensor never exists at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch

from shared.catalog import Task
from shared.forward_grad import ParamSpace

LOGIT_CHUNK_TOKENS = 512
"""Tokens whose losses one cross-entropy reduction sums (this fixes the loss's summation order)."""
LOGIT_BLOCK_TOKENS = 128
"""Tokens whose logits (49k floats each, 25 MB for 128) exist at once: a chunk is computed in blocks.
The loss does not change with it (see `_chunk_loss_sum`; checked bit for bit for 32 to 256 on
CPU/MKL, SmolLM2); 128 keeps the loss's peak below a decoder layer's in both estimators."""


class LossOf(torch.nn.Module):
    """The mean training loss of a batch as a module, so `torch.func.functional_call` can drive it."""

    def __init__(self, model: torch.nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.task == "classification":
            logits = self.model(**inputs).logits
            return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        return chunked_causal_loss(self.model, inputs, batch["labels"])


class HeadLossOf(LossOf):
    """The loss when only the classifier head is perturbed: the frozen encoder runs once per batch.

    The head's input (the pooled features) does not depend on the head's parameters, so every
    perturbation reuses it; each pass is then a small matrix product instead of a full forward.
    The loss is the same as `LossOf`'s (eval mode: dropout is the identity).
    """

    def __init__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], features: torch.Tensor | None = None
    ) -> None:
        super().__init__(model, "classification")
        base: Any = model.get_base_model()  # type: ignore[operator]
        self.features = self.encode(model, batch) if features is None else features
        self.classifier = base.classifier

    @staticmethod
    def encode(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's input for a batch: what the frozen encoder (and pooler) make of it."""
        base: Any = model.get_base_model()  # type: ignore[operator]
        encoder = getattr(base, base.base_model_prefix)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            features: torch.Tensor = base.dropout(encoder(**inputs)[1])
        return features

    @staticmethod
    def applies(model: torch.nn.Module, task: Task, space: ParamSpace) -> bool:
        base: Any = model.get_base_model() if hasattr(model, "get_base_model") else None  # type: ignore[operator]
        return (
            task == "classification"
            and base is not None
            and hasattr(base, "classifier")
            and hasattr(base, "dropout")
            and all("modules_to_save" in name for name in space.names)
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.classifier(self.features)
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])


class PoolerHeadLossOf(LossOf):
    """The loss when only the pooler's LoRA and the classifier head are perturbed.

    The encoder's output at the first token (what the pooler reads) does not depend on them, so
    it is computed once (and may be cached across steps); each pass runs the pooler and the head.
    """

    def __init__(self, model: torch.nn.Module, first_token: torch.Tensor) -> None:
        super().__init__(model, "classification")
        base: Any = model.get_base_model()  # type: ignore[operator]
        self.first_token = first_token
        self.pooler = getattr(base, base.base_model_prefix).pooler
        self.dropout = base.dropout
        self.classifier = base.classifier

    @staticmethod
    def encode(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder's last hidden state at the first token, for a batch."""
        base: Any = model.get_base_model()  # type: ignore[operator]
        encoder = getattr(base, base.base_model_prefix)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            hidden: torch.Tensor = encoder(**inputs)[0][:, :1]
        return hidden

    @staticmethod
    def applies(model: torch.nn.Module, task: Task, space: ParamSpace) -> bool:
        base: Any = model.get_base_model() if hasattr(model, "get_base_model") else None  # type: ignore[operator]
        encoder = getattr(base, getattr(base, "base_model_prefix", ""), None) if base is not None else None
        return (
            task == "classification"
            and getattr(encoder, "pooler", None) is not None
            and hasattr(base, "classifier")
            and all("modules_to_save" in name or ".pooler." in name for name in space.names)
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.classifier(self.dropout(self.pooler(self.first_token)))
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])


def chunked_causal_loss(
    model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    base: Any = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    # No KV cache: it would keep every layer's keys and values alive until the loss is done.
    hidden = base.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    step = max(1, LOGIT_CHUNK_TOKENS // hidden.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    count = (targets != -100).sum().clamp(min=1)
    for start in range(0, hidden.shape[1], step):
        total = total + _chunk_loss_sum(base.lm_head, hidden[:, start : start + step], targets[:, start : start + step])
    return total / count


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`cross_entropy(head(hidden), targets, reduction="sum")` with at most LOGIT_BLOCK_TOKENS rows of logits alive.

    Per-token losses are computed block by block (each row's logits and log-softmax do not depend
    on the other rows), then summed by `nll_loss` itself over the whole chunk: the same reduction
    kernel over the same values in the same order as `reduction="sum"` on the chunk, so the loss,
    and under `torch.func.jvp` its tangent, are unchanged bit for bit.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    per_token = torch.cat(
        [
            torch.nn.functional.cross_entropy(
                head(rows[start : start + LOGIT_BLOCK_TOKENS]).float(),
                flat_targets[start : start + LOGIT_BLOCK_TOKENS],
                reduction="none",
            )
            for start in range(0, rows.shape[0], LOGIT_BLOCK_TOKENS)
        ]
    )
    # nll_loss of a one-class "log-probability" -loss_i sums loss_i; ignored targets stay ignored.
    ignored = flat_targets == -100
    return torch.nn.functional.nll_loss(
        -per_token.unsqueeze(1), torch.where(ignored, -100, 0), ignore_index=-100, reduction="sum"
    )


def autocast_for(device: torch.device) -> Any:
    # Half precision where it is fast and the point is throughput; full precision on the CPU.
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def central_difference(
    loss_module: LossOf,
    batch: dict[str, torch.Tensor],
    params: Mapping[str, torch.nn.Parameter],
    space: ParamSpace,
    v: torch.Tensor,
    h: float,
) -> tuple[float, float]:
    pieces = space.unflatten(v)
    saved = {name: params[name].detach().clone() for name in space.names}
    device = v.device
    try:
        for name in space.names:
            params[name].add_(pieces[name], alpha=h)
        with autocast_for(device):
            plus = float(loss_module(batch))
        for name in space.names:
            params[name].add_(pieces[name], alpha=-2 * h)
        with autocast_for(device):
            minus = float(loss_module(batch))
    finally:
        for name in space.names:  # restore exactly, not by adding h v back (no drift)
            params[name].copy_(saved[name])
    return (plus - minus) / (2 * h), (plus + minus) / 2


def jvp_derivative(
    loss_module: LossOf,
    batch: dict[str, torch.Tensor],
    params: Mapping[str, torch.nn.Parameter],
    space: ParamSpace,
    v: torch.Tensor,
    h: float,
) -> tuple[float, float]:
    pieces = space.unflatten(v)
    primals = {f"model.{name}": params[name].detach() for name in space.names}
    tangents = {f"model.{name}": pieces[name] for name in space.names}

    def loss_at(values: dict[str, torch.Tensor]) -> torch.Tensor:
        result: torch.Tensor = torch.func.functional_call(loss_module, values, (batch,), strict=False)
        return result

    loss, derivative = torch.func.jvp(loss_at, (primals,), (tangents,))  # type: ignore[misc]
    return float(derivative), float(loss)


@torch.no_grad()
def batched_central_difference(
    loss_module: HeadLossOf,
    batch: dict[str, torch.Tensor],
    params: Mapping[str, torch.nn.Parameter],
    space: ParamSpace,
    directions: torch.Tensor,
    h: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of the head's loss along many directions (rows) at once.

    The head is one linear layer over cached features, so the logits of every perturbed head
    are one batched product: thousands of directions cost about as much as a few tiny passes.
    Returns (g, loss at the point) per direction, in float64.
    """
    weight_name = next(name for name in space.names if name.endswith("weight"))
    bias_name = next(name for name in space.names if name.endswith("bias"))
    features = loss_module.features.float()
    labels = batch["labels"]
    weight, bias = params[weight_name].detach().float(), params[bias_name].detach().float()
    pieces = space.unflatten_rows(directions)
    d_weight, d_bias = pieces[weight_name].to(weight), pieces[bias_name].to(bias)

    def losses(sign: float) -> torch.Tensor:
        logits = (
            torch.einsum("bh,pch->pbc", features, weight + sign * h * d_weight) + (bias + sign * h * d_bias)[:, None]
        )
        per_example = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.repeat(len(directions)), reduction="none"
        )
        return per_example.view(len(directions), -1).mean(dim=1).double()

    plus, minus = losses(1.0), losses(-1.0)
    return (plus - minus) / (2 * h), (plus + minus) / 2
