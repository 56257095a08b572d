"""Client-level differential privacy: DP-FedAvg (McMahan et al., 2018) and its privacy accountant.

With a spec's `privacy` block, each client's update (the delta of the global part, one vector over
all its tensors) is clipped to L2 norm `clip_norm` = C, and Gaussian noise N(0, (z C)^2) per
coordinate is added to the round's sum, z being `noise_multiplier`:

- `noise: server` (trusted aggregator): the aggregator clips every decoded update before it merges
  it and adds the noise once per round, to the sum, at commit.
- `noise: client` (untrusted aggregator, e.g. beside secure aggregation): each client clips its
  own delta and adds a share N(0, (z C)^2 / n), n = clients_per_round, so the sum of a full
  round carries the whole noise; the aggregator only sums (it cannot clip a noised update).

The noised sum is divided by n, the number of clients a round samples, not by the number that
arrived, and every client weighs 1 (the spec asks for `aggregation.weighting: uniform`): one
client then moves the average by at most C / n whatever the others did, which is what the
accountant assumes (the fixed-denominator estimator of DP-FedAvg). A round that loses clients to
its deadline takes a shorter step rather than a louder one.

Noise is drawn from torch generators seeded from the job seed and the round (and the client,
client-side) mixed with the deployment's `PWFF_DP_NOISE_KEY`, so the embedded and the
distributed services, and a restarted aggregator, add the same noise, and a retried task uploads
the same noised delta (two independent draws of one client's update would average the noise
down). Without a key, anyone who knows the job seed (it is in the job's spec) can regenerate the
noise and subtract it: fine for experiments, never for production.

The accountant is Google's `dp-accounting` (its Renyi-DP accountant): each round is a Poisson-subsampled
Gaussian mechanism with sampling rate q = clients_per_round / num_clients and noise multiplier z,
composed over the rounds. pwff samples a fixed number of clients without replacement, so the
Poisson-sampling analysis is the customary approximation of it (exact when q = 1). RDP, not the
tighter privacy-loss-distribution accountant: the scheduler computes epsilon for the job view on
request, and RDP costs milliseconds for any spec, where PLD's cost grows without bound as z falls
(minutes at z = 0.05 over 10,000 rounds).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.seeding import derive_seed

if TYPE_CHECKING:  # the scheduler reads budgets without torch; only the worker and the aggregator use tensors
    import torch

    from shared.spec import JobSpec, PrivacySpec

State = dict[str, "torch.Tensor"]

# Integer RDP orders: dp-accounting's default set adds fractional orders below 11 whose series do not
# converge for large sampling rates (they are skipped with a warning); integers lose little.
_RDP_ORDERS = (*range(2, 64), 80, 96, 128, 192, 256, 384, 512, 1024)


def l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of an update taken as one vector over all its tensors (float64)."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in update.values()))


def clip(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[State, float]:
    """The update scaled to L2 norm at most `clip_norm` (float64), and its norm before clipping."""
    import torch

    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: tensor.detach().to("cpu", torch.float64) * scale for name, tensor in update.items()}, norm


def gaussian_noise(like: Mapping[str, torch.Tensor], std: float, seed: int) -> State:
    """Independent N(0, std^2) for every coordinate of `like` (float64), drawn in name order from `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(like[name].shape, generator=generator, dtype=torch.float64) * std for name in sorted(like)
    }


def noise_seed(spec: JobSpec, *parts: object) -> int:
    """The seed of one noise draw: the job seed and `parts`, keyed by PWFF_DP_NOISE_KEY when it is set."""
    from shared.settings import Settings  # read where it is used: the worker and the aggregator both need it

    key = Settings().dp_noise_key.get_secret_value()
    return derive_seed("dp-noise", key, spec.seed, *parts)


def sum_std(privacy: PrivacySpec) -> float:
    """The standard deviation of the noise on the round's sum: z C."""
    return privacy.noise_multiplier * privacy.clip_norm


def privatize_client(spec: JobSpec, delta: Mapping[str, torch.Tensor], round_: int, client: int) -> State:
    """Client-side noise: the client's delta clipped to C plus its share N(0, (z C)^2 / n) (float32)."""
    import torch

    privacy = spec.privacy
    if privacy is None or privacy.noise != "client":
        raise ValueError("privatize_client needs a job with privacy.noise 'client'")
    clipped, _ = clip(delta, privacy.clip_norm)
    share = sum_std(privacy) / math.sqrt(spec.clients_per_round)
    noise = gaussian_noise(clipped, share, noise_seed(spec, "client", round_, client))
    return {name: (clipped[name] + noise[name]).to(torch.float32) for name in clipped}


class PrivateSum:
    """A round's running sum of (server-side: clipped) deltas, float64, every client weighing 1.

    Satisfies `shared.aggregation.DeltaAggregate`; the weight a mode passes is ignored on purpose
    (see the module's docstring). Server-side it also keeps the pre-clipping norms the round saw,
    the figure a user calibrates C from.
    """

    def __init__(self, privacy: PrivacySpec) -> None:
        self.privacy = privacy
        self.sum: State = {}
        self.count = 0
        self.norms: list[float] = []

    def check(self, update: Mapping[str, torch.Tensor]) -> None:
        from shared.aggregation import check_update  # imports torch: the job view imports this module

        check_update(update, self.sum)

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        import torch

        self.check(update)
        if self.privacy.noise == "server":
            terms, norm = clip(update, self.privacy.clip_norm)
            self.norms.append(norm)
        else:  # already clipped and noised by the client: its norm says nothing and must not be clipped again
            terms = {name: tensor.detach().to("cpu", torch.float64) for name, tensor in update.items()}
        for name, term in terms.items():
            if name in self.sum:
                self.sum[name] += term
            else:
                self.sum[name] = term
        self.count += 1


@dataclass(frozen=True)
class Committed:
    state: State
    figures: dict[str, float]


def commit(spec: JobSpec, state: Mapping[str, torch.Tensor], aggregate: PrivateSum, round_: int) -> Committed:
    """The round's new global state: (sum + server noise) / n applied with the server learning rate.

    Figures: `dp_epsilon` (spent through this round at `privacy.delta`), `dp_noise_std` (of the
    average's noise per coordinate) and, server-side, the pre-clipping norms and the share clipped.
    """
    import torch

    from shared.aggregation import apply_update

    privacy = spec.privacy
    assert privacy is not None  # the caller checked
    n = spec.clients_per_round
    total = dict(aggregate.sum)
    if privacy.noise == "server" and privacy.noise_multiplier > 0:
        noise = gaussian_noise(total, sum_std(privacy), noise_seed(spec, "server", round_))
        total = {name: value + noise[name] for name, value in total.items()}
    mean = {name: (value / n).to(torch.float32) for name, value in total.items()}
    figures = {
        "dp_epsilon": epsilon(spec, round_),
        "dp_noise_std": sum_std(privacy) / n,
    }
    if aggregate.norms:
        norms = torch.tensor(aggregate.norms, dtype=torch.float64)
        figures.update(
            dp_update_norm_median=float(norms.median()),
            dp_update_norm_max=float(norms.max()),
            dp_clipped_fraction=float((norms > privacy.clip_norm).double().mean()),
        )
    return Committed(apply_update(state, mean, spec.aggregation.server_lr), figures)


# -- accounting ---------------------------------------------------------------------------------


def sampling_rate(spec: JobSpec) -> float:
    return spec.clients_per_round / spec.num_clients


def epsilon(spec: JobSpec, rounds: int) -> float:
    """Epsilon spent after `rounds` rounds of the job at its `privacy.delta` (inf without noise)."""
    privacy = spec.privacy
    if privacy is None:
        raise ValueError("the job has no privacy block")
    return accountant_epsilon(sampling_rate(spec), privacy.noise_multiplier, rounds, privacy.delta)


@functools.lru_cache(maxsize=4096)
def accountant_epsilon(q: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of `rounds` compositions of a Poisson-subsampled Gaussian (rate q, multiplier z) at `delta`."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds
    )
    accountant = rdp_privacy_accountant.RdpAccountant(list(_RDP_ORDERS))
    try:
        return float(accountant.compose(event).get_epsilon(delta))
    except ArithmeticError:  # z so small that z^2 underflows: nothing is bounded
        return math.inf


def privacy_view(spec: JobSpec, history: list[Any]) -> dict[str, Any] | None:
    """`services.scheduler.views.PrivacyView` of a job, from its committed rounds' records (None without privacy)."""
    privacy = spec.privacy
    if privacy is None:
        return None
    committed = max((record.round for record in history), default=0)
    return {
        "delta": privacy.delta,
        "epsilon_spent": epsilon(spec, committed),
        "epsilon_total": epsilon(spec, spec.rounds),
        "sampling_rate": sampling_rate(spec),
    }
