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

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        super().__init__(model, "classification")
        base: Any = model.get_base_model()  # type: ignore[operator]
        encoder = getattr(base, base.base_model_prefix)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            self.features = base.dropout(encoder(**inputs)[1])
        self.classifier = base.classifier

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
