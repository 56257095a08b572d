"""What every round reports whatever its training mode: who merged, losses, bytes, compute, device costs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.messages import UpdateReady
from shared.metrics import DEVICE_DELAY, DEVICE_ENERGY
from shared.modes.base import RoundAccumulator
from shared.spec import JobSpec
from shared.wireless import round_cost, round_profile


@dataclass
class RoundTally:
    spec: JobSpec
    merged: list[tuple[int, int]] = field(default_factory=list)
    """(client, wave) of every merged update, in merge order."""
    loss_weighted: float = 0.0
    weight: float = 0.0
    upload_bytes: int = 0
    compute_s_max: float = 0.0
    compute_s_sum: float = 0.0
    devices: dict[int, dict[str, float]] = field(default_factory=dict)
    """Simulated wireless cost of each client's work this round (delay, energy, link rate)."""

    @property
    def clients(self) -> list[int]:
        return sorted({client for client, _ in self.merged})

    def next_wave(self) -> int:
        return 1 + max((wave for _, wave in self.merged), default=0)

    def add(self, announce: UpdateReady, weight: float) -> None:
        spec = self.spec
        profile = round_profile(spec.devices, spec.num_clients, spec.seed, announce.client, announce.round)
        cost = round_cost(profile, announce.flops, announce.upload_bytes)
        device = self.devices.setdefault(announce.client, {"delay_s": 0.0, "energy_j": 0.0, "upload_s": 0.0})
        # A client's waves run one after the other on the same device.
        device["delay_s"] += cost.total_s
        device["upload_s"] += cost.upload_s
        device["energy_j"] += cost.total_j
        device["rate_bps"] = cost.rate_bps
        device["flops"] = device.get("flops", 0.0) + announce.flops
        self.merged.append((announce.client, announce.wave))
        self.loss_weighted += announce.train_loss * weight
        self.weight += weight
        self.upload_bytes += announce.upload_bytes
        self.compute_s_max = max(self.compute_s_max, announce.compute_s)
        self.compute_s_sum += announce.compute_s

    def figures(self, bytes_down_per_update: int) -> dict[str, float]:
        figures = {
            "train_loss": self.loss_weighted / (self.weight or 1.0),
            "num_clients": float(len(self.clients)),
            "updates": float(len(self.merged)),
            "bytes_up": float(self.upload_bytes),
            "bytes_down": float(bytes_down_per_update * len(self.merged)),
            "compute_s_max": self.compute_s_max,
            "compute_s_sum": self.compute_s_sum,
        }
        devices = self.devices.values()
        if devices:
            figures.update(
                delay_s=max(d["delay_s"] for d in devices),  # the round waits for the slowest device
                delay_s_mean=sum(d["delay_s"] for d in devices) / len(devices),
                energy_j=sum(d["energy_j"] for d in devices),
                upload_s_max=max(d["upload_s"] for d in devices),
            )
        return figures

    def observe_devices(self) -> None:
        for figures in self.devices.values():
            DEVICE_DELAY.observe(figures["delay_s"])
            DEVICE_ENERGY.inc(figures["energy_j"])

    def extra(self) -> dict[str, Any]:
        return {"devices": {str(c): d for c, d in sorted(self.devices.items())}}


@dataclass
class OpenRound:
    """A round being merged: the mode's aggregate and the mode-independent tally."""

    accumulator: RoundAccumulator[Any]
    tally: RoundTally
