"""Aggregation strategies: how the server merges clients' deltas of the global part.

A strategy is a small class registered by name in `shared.registry.STRATEGIES` (the spec's
`aggregation.strategy`). It streams: each delta is added as it arrives, so memory is
O(model), not O(clients x model). Sums are kept in float64 so the result does not depend,
to float32 precision, on the order in which updates happened to arrive (embedded and
distributed runs agree).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from shared.spec import JobSpec


class DeltaAggregate(Protocol):
    """A round's running aggregate of deltas."""

    count: int

    def check(self, update: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError if `update` can never be added (names, NaN/Inf, a memory bound); adds nothing."""
        ...

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None: ...


def check_update(update: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor]) -> None:
    """An update must name what the round merged so far and hold only finite values.

    The codec already rejects NaN/Inf while decoding; this is the last check before a strategy
    sees the values, whatever produced them.
    """
    if merged and set(update) != set(merged):
        raise ValueError("update names differ from the ones already merged")
    for name, tensor in update.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"tensor {name!r} has NaN or infinite values")


class AggregationStrategy(ABC):
    """Turns a stream of weighted deltas into the round's new global state.

    Robust aggregators (clipping, median, trimmed mean, Krum: `shared.robust`) subclass this and register a name.
    """

    @abstractmethod
    def start(self, spec: JobSpec) -> DeltaAggregate:
        """An empty aggregate for one round."""

    @abstractmethod
    def apply(
        self, spec: JobSpec, state: Mapping[str, torch.Tensor], aggregate: DeltaAggregate
    ) -> dict[str, torch.Tensor]:
        """The new global state; tensors without a delta (personal parts) keep their value."""


class StreamingMean:
    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    def check(self, update: Mapping[str, torch.Tensor]) -> None:
        check_update(update, self._sum)

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        self.check(update)
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


class FedAvg(AggregationStrategy):
    """Weighted mean of the deltas, applied with the server learning rate (1: plain FedAvg)."""

    def start(self, spec: JobSpec) -> StreamingMean:
        return StreamingMean()

    def apply(
        self, spec: JobSpec, state: Mapping[str, torch.Tensor], aggregate: DeltaAggregate
    ) -> dict[str, torch.Tensor]:
        if not isinstance(aggregate, StreamingMean):
            raise TypeError(f"FedAvg cannot apply a {type(aggregate).__name__}")
        return apply_update(state, aggregate.mean(), spec.aggregation.server_lr)
