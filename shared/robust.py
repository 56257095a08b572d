"""Robust aggregation: strategies that a minority of bad or malicious clients cannot steer.

Registered in `shared.registry.STRATEGIES` beside FedAvg and selected by the spec's
`aggregation.strategy`; their parameters are the spec's `aggregation.robust` block.

- `clip`: each client's delta is scaled down to an L2 norm of at most `clip_norm` (over the whole
  global part at once), then averaged. Streaming: O(model) memory.
- `median`: the coordinate-wise median of the round's deltas.
- `trimmed_mean`: per coordinate, the `trim_fraction` largest and smallest values are dropped and
  the rest averaged.
- `krum`: (Multi-)Krum (Blanchard et al., 2017): each delta is scored by the sum of its squared
  distances to its n - f - 2 nearest others (f: `byzantine`); the `krum_selected` lowest-scoring
  deltas are averaged (1: Krum, more: Multi-Krum).

Every robust strategy treats the clients alike: a client's self-reported `num_samples` is not
trusted (issue 12: one forged announcement with num_samples 100000 dominated the weighted mean),
so `aggregation.weighting` applies to `fedavg` only. The clipped mean is unweighted for the same
reason: a weight cap the server cannot check would still let a liar claim the cap.

Median, trimmed mean and Krum need the whole round at once, so their aggregate buffers every delta
(float32, the global part only) up to `max_buffer_mb`; an update that would overflow the buffer is
rejected (counted and dead-lettered like any invalid update) and the round commits from the ones
already buffered. Applying also needs one tensor's worth of scratch per name (a sorted stack, or
float64 distances for Krum), so the peak is about the buffer plus one tensor x clients x 2.

Non-finite deltas never reach a strategy: the codec rejects them while decoding and every
aggregate's `check` rejects them again (an update is checked before anything is merged).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from shared.aggregation import AggregationStrategy, DeltaAggregate, apply_update, check_update
from shared.seeding import derive_seed

if TYPE_CHECKING:
    from shared.spec import JobSpec

State = dict[str, torch.Tensor]

MB = 1024 * 1024


class BufferFull(ValueError):
    """An update that would take a buffered aggregate past its memory bound."""


class ClippedMean:
    """The unweighted mean of deltas each clipped to an L2 norm of at most `clip_norm` (streaming)."""

    def __init__(self, clip_norm: float) -> None:
        self.clip_norm = clip_norm
        self._sum: State = {}
        self.count = 0
        self.clipped = 0
        """Updates whose norm was above the bound."""

    def check(self, update: Mapping[str, torch.Tensor]) -> None:
        check_update(update, self._sum)

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        self.check(update)
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        norm = l2_norm(update)
        factor = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        self.clipped += factor < 1.0
        for name, tensor in update.items():
            term = tensor.detach().to("cpu", torch.float64) * factor
            if name in self._sum:
                self._sum[name] += term
            else:
                self._sum[name] = term
        self.count += 1

    def mean(self) -> State:
        if not self.count:
            raise ValueError("no updates merged")
        return {name: (total / self.count).to(torch.float32) for name, total in self._sum.items()}


class BufferedUpdates:
    """Every delta of a round, kept (float32, on the CPU) until the round commits, up to `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.updates: list[State] = []
        self.bytes = 0
        self.count = 0

    def check(self, update: Mapping[str, torch.Tensor]) -> None:
        check_update(update, self.updates[0] if self.updates else {})
        size = sum(4 * t.numel() for t in update.values())
        if self.bytes + size > self.max_bytes:
            raise BufferFull(
                f"the round's buffer holds {self.count} updates ({self.bytes / MB:.1f} MiB); another "
                f"{size / MB:.1f} MiB would pass aggregation.robust.max_buffer_mb ({self.max_bytes / MB:g})"
            )

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        # The weight is ignored on purpose: robust strategies treat every client alike (module docstring).
        self.check(update)
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        self.updates.append({name: t.detach().to("cpu", torch.float32).clone() for name, t in update.items()})
        self.bytes += sum(4 * t.numel() for t in update.values())
        self.count += 1

    def stacked(self, name: str) -> torch.Tensor:
        """(clients, numel) of one tensor, in the order the updates arrived."""
        return torch.stack([u[name].reshape(-1) for u in self.updates])


def l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a whole update (all its tensors as one vector), in float64."""
    return float(sum(float(t.double().square().sum()) for t in update.values())) ** 0.5


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Per column of (n, d): the median, the mean of the two middle values when n is even."""
    ordered = stack.double().sort(dim=0).values
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, trim: int) -> torch.Tensor:
    """Per column of (n, d): the mean after dropping the `trim` largest and `trim` smallest values."""
    n = stack.shape[0]
    if n - 2 * trim < 1:
        raise ValueError(f"cannot trim {trim} per side from {n} values")
    ordered = stack.double().sort(dim=0).values
    return ordered[trim : n - trim].mean(dim=0)


def trim_count(n: int, fraction: float) -> int:
    """Values dropped per side: floor(fraction x n), kept below half so at least one value remains."""
    return min(int(fraction * n + 1e-9), (n - 1) // 2)


def krum_select(buffer: BufferedUpdates, byzantine: int, selected: int) -> list[int]:
    """Indices of the `selected` updates with the lowest Krum scores (ties: arrival order).

    f is lowered to the largest value the round supports, (n - 3) // 2, when fewer updates arrived
    than the spec planned for (dropouts, rejected uploads): Krum needs n > 2f + 2.
    """
    n = buffer.count
    f = max(0, min(byzantine, (n - 3) // 2))
    neighbours = max(1, n - f - 2)
    distances = torch.zeros(n, n, dtype=torch.float64)
    for name in buffer.updates[0]:
        stack = buffer.stacked(name).double()
        distances += torch.cdist(stack, stack).square()
    if n == 1:
        return [0]
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(others.sort().values[:neighbours].sum()))
    order = sorted(range(n), key=lambda i: (scores[i], i))
    return order[: max(1, min(selected, n - f))]


class _Buffered(AggregationStrategy):
    """A strategy that sees the whole round: buffers the deltas, reduces them when the round commits."""

    def start(self, spec: JobSpec) -> BufferedUpdates:
        return BufferedUpdates(int(spec.aggregation.robust.max_buffer_mb * MB))

    def apply(self, spec: JobSpec, state: Mapping[str, torch.Tensor], aggregate: DeltaAggregate) -> State:
        if not isinstance(aggregate, BufferedUpdates):
            raise TypeError(f"{type(self).__name__} cannot apply a {type(aggregate).__name__}")
        if not aggregate.count:
            raise ValueError("no updates merged")
        return apply_update(state, self.reduce(spec, aggregate), spec.aggregation.server_lr)

    def reduce(self, spec: JobSpec, buffer: BufferedUpdates) -> State:
        raise NotImplementedError


class Clip(AggregationStrategy):
    """Norm clipping: each delta clipped to `aggregation.robust.clip_norm`, then the unweighted mean."""

    def start(self, spec: JobSpec) -> ClippedMean:
        return ClippedMean(spec.aggregation.robust.clip_norm)

    def apply(self, spec: JobSpec, state: Mapping[str, torch.Tensor], aggregate: DeltaAggregate) -> State:
        if not isinstance(aggregate, ClippedMean):
            raise TypeError(f"Clip cannot apply a {type(aggregate).__name__}")
        return apply_update(state, aggregate.mean(), spec.aggregation.server_lr)


class Median(_Buffered):
    """Coordinate-wise median of the round's deltas."""

    def reduce(self, spec: JobSpec, buffer: BufferedUpdates) -> State:
        return {
            name: coordinate_median(buffer.stacked(name)).to(torch.float32).view(shape.shape)
            for name, shape in buffer.updates[0].items()
        }


class TrimmedMean(_Buffered):
    """Coordinate-wise trimmed mean: floor(trim_fraction x n) values dropped at each end."""

    def reduce(self, spec: JobSpec, buffer: BufferedUpdates) -> State:
        trim = trim_count(buffer.count, spec.aggregation.robust.trim_fraction)
        return {
            name: trimmed_mean(buffer.stacked(name), trim).to(torch.float32).view(first.shape)
            for name, first in buffer.updates[0].items()
        }


class Krum(_Buffered):
    """(Multi-)Krum: the mean of the `krum_selected` deltas closest to their n - f - 2 nearest others."""

    def reduce(self, spec: JobSpec, buffer: BufferedUpdates) -> State:
        robust = spec.aggregation.robust
        chosen = krum_select(buffer, robust.byzantine, robust.krum_selected)
        return {
            name: torch.stack([buffer.updates[i][name].double() for i in chosen]).mean(dim=0).to(torch.float32)
            for name in buffer.updates[0]
        }


# -- poisoned clients (a test and benchmark simulation, never for production jobs) --------------


def poisoned_clients(spec: JobSpec) -> frozenset[int]:
    """The clients `simulation.poison` turns bad: round(fraction x num_clients) of them, fixed for the
    whole job and drawn from the job's seed (so every worker agrees)."""
    poison = spec.simulation.poison
    count = round(poison.fraction * spec.num_clients)
    if count <= 0:
        return frozenset()
    generator = torch.Generator().manual_seed(derive_seed("poison", spec.seed))
    return frozenset(int(c) for c in torch.randperm(spec.num_clients, generator=generator)[:count])


def poison_delta(spec: JobSpec, delta: Mapping[str, torch.Tensor], seed: int) -> State:
    """What a poisoned client uploads instead of its honest `delta` (`simulation.poison.kind`).

    nan: every value NaN; scale: the delta times `scale`; sign_flip: minus the delta; noise: Gaussian
    noise with `scale` times the honest delta's RMS as its standard deviation, per tensor.
    """
    poison = spec.simulation.poison
    if poison.kind == "nan":
        return {name: torch.full_like(t, float("nan")) for name, t in delta.items()}
    if poison.kind == "scale":
        return {name: t * poison.scale for name, t in delta.items()}
    if poison.kind == "sign_flip":
        return {name: -t for name, t in delta.items()}
    generator = torch.Generator().manual_seed(seed)
    out: State = {}
    for name, t in sorted(delta.items()):
        rms = float(t.double().square().mean().sqrt()) or 1e-3
        out[name] = torch.randn(t.shape, generator=generator, dtype=torch.float32) * (poison.scale * rms)
    return out
