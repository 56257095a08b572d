"""Streaming weighted FedAvg: memory O(model), not O(clients x model).

Sums are kept in float64 so the result does not depend, to float32 precision, on the
order in which updates happened to arrive (embedded and distributed runs agree).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class StreamingMean:
    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._sum and set(update) != set(self._sum):
            raise ValueError("update names differ from the ones already merged")
        for name, tensor in update.items():
            term = tensor.detach().to("cpu", torch.float64) * weight
            if name in self._sum:
                self._sum[name] += term
            else:
                self._sum[name] = term
        self.total_weight += weight
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError("no updates merged")
        return {name: (total / self.total_weight).to(torch.float32) for name, total in self._sum.items()}


def apply_update(
    state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor], server_lr: float
) -> dict[str, torch.Tensor]:
    """Server SGD on the averaged delta: with server_lr = 1 this is plain FedAvg.

    Tensors without a delta (a client's personal parts) keep their value.
    """
    return {
        name: (value.double() + server_lr * mean_delta[name].double()).float() if name in mean_delta else value
        for name, value in state.items()
    }
