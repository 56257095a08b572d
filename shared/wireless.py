"""The wireless delay and energy model of PWFF (arXiv 2404.13238): every client is a wireless device.

A round on one device costs local computation and then an uplink transmission of the update:

* Uplink rate (Shannon capacity of an AWGN link, bit/s)::

      r = B * log2(1 + p * g / (N0 * B)),     g = |h|^2 * 10^(-L/10),     N0[W/Hz] = 10^((N0[dBm/Hz] - 30)/10)

  with B the uplink bandwidth (Hz), p the transmit power (W), L the large-scale path loss (dB),
  |h|^2 the small-scale fading power gain (dimensionless) and N0 the noise power spectral density.
* Upload delay ``T_up = 8 * bytes / r`` (s) and upload energy ``E_up = p * T_up`` (J).
* Compute time ``T_cmp = FLOPs / f`` (s) with f the sustained compute speed (FLOP/s), and compute
  energy ``E_cmp = FLOPs * e`` (J) with e the energy per FLOP (J/FLOP).
* FLOPs: a forward pass costs about ``2 * N * tokens`` for N active parameters (one multiply and one
  add per parameter per token); a backprop step adds a backward pass that computes activation
  gradients through every layer (~1x a forward) and weight gradients only for the trainable
  parameters (~``2 * N_trainable * tokens``): ~6NT for full fine-tuning, ~4NT with a frozen base and
  LoRA; a forward-gradient perturbation (FwdLLM) two inferences, 2x a forward.

Everything is in SI units: Hz, W, s, J, bit/s, FLOP and FLOP/s; byte counts are converted with 8 bits
per byte. Downlink (the server broadcasting the global model) is not modelled: base stations transmit
at far higher power and bandwidth, so the uplink dominates, as in most wireless-FL models.

Default device parameters (see `DevicePopulation`) follow common wireless-FL simulation settings:
N0 = -174 dBm/Hz (thermal noise at 290 K), user transmit power 0.1 to 0.2 W (20 to 23 dBm; 23 dBm is
the maximum of LTE/NR UE power class 3), per-device uplink bandwidth 0.5 to 2 MHz (a share of a 10 to
20 MHz LTE/5G carrier split among several scheduled users, or a few 180 kHz LTE resource blocks
each), path loss 100 to 130 dB (the 3GPP macro-cell model 128.1 + 37.6 log10(d / km) gives about 90
dB at 50 m and 125 dB at 800 m), Rayleigh fading, sustained mobile compute 5e10 to 1e12 FLOP/s (phone
CPUs to phone GPUs/NPUs at realistic training utilization, well below their multi-TFLOP/s peaks) and
1e-11 to 1e-10 J/FLOP (a few watts at those throughputs).

A second population, `preset: cellular-edge` (see `POPULATION_PRESETS`), puts the same devices at
the edge of a cellular IoT cell, where the uplink is the bottleneck: 180 kHz to 1.08 MHz (one
LTE resource block, NB-IoT's whole carrier, up to the six blocks of an LTE-M narrowband),
14 to 23 dBm (UE power classes 6 to 3), path loss 125 to 145 dB (the macro-cell model at 0.8 to
2.8 km; legacy LTE's coverage ends near 144 dB of coupling loss), and a base-station receiver
noise figure of 5 dB on top of thermal noise. Shannon's formula then gives ~10 kbit/s to
~2.7 Mbit/s (median ~0.3 Mbit/s) before fading, the range NB-IoT and LTE-M uplinks quote
(tens of kbit/s to 1 Mbit/s). The README cites the sources.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.seeding import derive_seed

BITS_PER_BYTE = 8


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceProfile(_Strict):
    """One client device: its uplink channel and its compute hardware (all SI units)."""

    bandwidth_hz: float = Field(
        1e6, gt=0, le=1e10, allow_inf_nan=False, description="uplink bandwidth B allocated to the device, Hz"
    )
    tx_power_w: float = Field(0.2, gt=0, le=100, allow_inf_nan=False, description="uplink transmit power p, W")
    path_loss_db: float = Field(
        110.0, ge=0, le=250, allow_inf_nan=False, description="large-scale path loss L, dB (typically 100 to 130)"
    )
    fading: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="small-scale channel power gain |h|^2, dimensionless (Rayleigh: exponential with mean 1)",
    )
    noise_psd_dbm_hz: float = Field(
        -174.0, ge=-250, le=0, allow_inf_nan=False, description="noise power spectral density N0, dBm/Hz"
    )
    flops_per_s: float = Field(
        2e11, gt=0, allow_inf_nan=False, description="sustained compute speed f of local training, FLOP/s"
    )
    joules_per_flop: float = Field(
        3e-11, gt=0, allow_inf_nan=False, description="energy per FLOP e of local training, J/FLOP"
    )
    memory_mb: float = Field(
        8192.0,
        gt=0,
        le=10_000_000,
        allow_inf_nan=False,
        description="memory local training may use, MB: `mode: auto` trains a client with forward gradients "
        "when a backprop step of the job's model and batch does not fit",
    )


# --- formulas -------------------------------------------------------------------------------------


def dbm_to_w(dbm: float) -> float:
    """A power in dBm as watts: 10^((dBm - 30) / 10); e.g. 23 dBm = 0.1995 W, -174 dBm = 3.98e-21 W."""
    return float(10.0 ** ((dbm - 30.0) / 10.0))


def noise_w_per_hz(profile: DeviceProfile) -> float:
    """N0 in W/Hz: 10^((N0_dBm/Hz - 30) / 10); -174 dBm/Hz is 3.98e-21 W/Hz (k * 290 K)."""
    return dbm_to_w(profile.noise_psd_dbm_hz)


def channel_gain(profile: DeviceProfile) -> float:
    """The channel power gain g = |h|^2 * 10^(-L/10), dimensionless (110 dB with |h|^2 = 1 gives 1e-11)."""
    return profile.fading * 10.0 ** (-profile.path_loss_db / 10.0)


def snr(profile: DeviceProfile) -> float:
    """Received signal-to-noise ratio p * g / (N0 * B), linear (not dB)."""
    return profile.tx_power_w * channel_gain(profile) / (noise_w_per_hz(profile) * profile.bandwidth_hz)


def uplink_rate_bps(profile: DeviceProfile) -> float:
    """Shannon capacity of the uplink, B * log2(1 + SNR), in bit/s.

    Example: B = 1 MHz, p = 0.1 W, L = 100 dB, |h|^2 = 1, N0 = -174 dBm/Hz gives SNR = 1e-11 / 3.98e-15
    = 2512 (34 dB) and r = 1e6 * log2(2513) = 11.3 Mbit/s.
    """
    return profile.bandwidth_hz * math.log2(1.0 + snr(profile))


def _non_negative(name: str, value: float) -> None:
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def upload_delay_s(num_bytes: float, profile: DeviceProfile) -> float:
    """Seconds to transmit `num_bytes` bytes at the uplink rate: 8 * bytes / r."""
    _non_negative("num_bytes", num_bytes)
    return BITS_PER_BYTE * num_bytes / uplink_rate_bps(profile)


def upload_energy_j(num_bytes: float, profile: DeviceProfile) -> float:
    """Joules the radio spends transmitting `num_bytes` bytes: p * upload_delay_s (power x airtime)."""
    return profile.tx_power_w * upload_delay_s(num_bytes, profile)


def compute_time_s(flops: float, profile: DeviceProfile) -> float:
    """Seconds of local computation for `flops` floating-point operations: FLOPs / f."""
    _non_negative("flops", flops)
    return flops / profile.flops_per_s


def compute_energy_j(flops: float, profile: DeviceProfile) -> float:
    """Joules spent on `flops` floating-point operations: FLOPs * e."""
    _non_negative("flops", flops)
    return flops * profile.joules_per_flop


# --- FLOP counting --------------------------------------------------------------------------------


def forward_flops(num_params_active: int, tokens: int) -> int:
    """FLOPs of one forward pass: 2 * N * tokens (a multiply and an add per parameter per token).

    N counts the parameters a token passes through: the frozen base model plus the adapters. LoRA adds
    a negligible share (r = 8 on two projections of SmolLM2-135M is about 0.5 M of 135 M), so the base
    model's count is a good N. Attention's sequence-length-squared term is ignored, which is accurate
    while the context is short next to the model width times a few (true for max_length of a few hundred).
    """
    if num_params_active < 0 or tokens < 0:
        raise ValueError(f"num_params_active and tokens must be >= 0, got {num_params_active} and {tokens}")
    return 2 * num_params_active * tokens


def backprop_step_flops(num_params_active: int, tokens: int, num_params_trainable: int | None = None) -> int:
    """FLOPs of one backprop training step: forward ``2 N T``, plus a backward pass of activation
    gradients ``2 N T`` (every layer a token passed through, frozen or not, so the gradient reaches the
    trainable ones) and weight gradients ``2 N_trainable T`` (only for trainable parameters).

    Full fine-tuning (N_trainable = N, the default) costs the usual ~6NT, 3x a forward; a frozen base
    with LoRA (N_trainable well under 1% of N) ~4NT, 2x a forward. N and N_trainable are counted as
    `forward_flops` counts N (every parameter, the same approximation for both).
    """
    forward = forward_flops(num_params_active, tokens)
    trainable = num_params_active if num_params_trainable is None else num_params_trainable
    if not 0 <= trainable <= num_params_active:
        raise ValueError(f"num_params_trainable must be in 0..{num_params_active}, got {trainable}")
    return 2 * forward + forward_flops(trainable, tokens)


def fwd_perturbation_flops(num_params_active: int, tokens: int) -> int:
    """FLOPs of one forward-gradient perturbation (FwdLLM): 2 x forward.

    The `fd` estimator runs two inferences, at theta + h v and theta - h v. The `jvp` estimator runs one
    forward-mode pass that carries a tangent next to every activation, which costs about the same as
    two forwards, so both are counted as 2x (parameter perturbation itself is O(N), negligible).
    """
    return 2 * forward_flops(num_params_active, tokens)


# --- round cost and budgets -----------------------------------------------------------------------


@dataclass(frozen=True)
class RoundCost:
    """What one round costs one device: seconds, joules and the link rate used."""

    compute_s: float
    upload_s: float
    total_s: float  # compute_s + upload_s: the device computes, then transmits
    compute_j: float
    upload_j: float
    total_j: float  # compute_j + upload_j
    rate_bps: float


def round_cost(profile: DeviceProfile, flops: float, upload_bytes: float) -> RoundCost:
    """Delay and energy of a round with `flops` of local work and an upload of `upload_bytes` bytes."""
    compute_s = compute_time_s(flops, profile)
    upload_s = upload_delay_s(upload_bytes, profile)
    compute_j = compute_energy_j(flops, profile)
    upload_j = profile.tx_power_w * upload_s
    return RoundCost(
        compute_s=compute_s,
        upload_s=upload_s,
        total_s=compute_s + upload_s,
        compute_j=compute_j,
        upload_j=upload_j,
        total_j=compute_j + upload_j,
        rate_bps=uplink_rate_bps(profile),
    )


def _max_units(
    profile: DeviceProfile,
    deadline_s: float,
    flops_per_unit: float,
    upload_bytes: float,
    cap: int,
    bytes_per_unit: float = 0.0,
) -> int:
    """The largest s in 0..cap with compute_time(s * flops_per_unit) + upload_delay(upload_bytes +
    s * bytes_per_unit) <= deadline_s; 0 when not even the upload alone fits.

    The closed form floor(slack / per-unit time) is corrected by stepping against the exact cost
    expression, so floating-point rounding can never return a budget that misses the deadline.
    """
    if not deadline_s > 0 or not math.isfinite(deadline_s):
        raise ValueError(f"deadline_s must be a finite number > 0, got {deadline_s}")
    _non_negative("flops per unit", flops_per_unit)
    _non_negative("upload_bytes", upload_bytes)
    _non_negative("bytes per unit", bytes_per_unit)
    if cap < 0:
        raise ValueError(f"cap must be >= 0, got {cap}")

    def cost(s: int) -> float:
        return compute_time_s(s * flops_per_unit, profile) + upload_delay_s(upload_bytes + s * bytes_per_unit, profile)

    if cost(0) > deadline_s:
        return 0
    per_unit = cost(1) - cost(0)
    s = cap if per_unit <= 0 else min(cap, int((deadline_s - cost(0)) / per_unit))
    while s > 0 and cost(s) > deadline_s:
        s -= 1
    while s < cap and cost(s + 1) <= deadline_s:
        s += 1
    return s


def max_local_steps(
    profile: DeviceProfile, deadline_s: float, flops_per_step: float, upload_bytes: float, cap: int
) -> int:
    """The most local (backprop) steps, 0..cap, whose compute plus the upload meets the deadline.

    s = max{s <= cap : s * flops_per_step / f + 8 * upload_bytes / r <= deadline_s}; 0 when the upload
    alone misses the deadline (the caller can tell "no room for steps" from "cannot even upload" with
    `round_cost(profile, 0, upload_bytes).total_s <= deadline_s`).
    """
    return _max_units(profile, deadline_s, flops_per_step, upload_bytes, cap)


def max_perturbations(
    profile: DeviceProfile,
    deadline_s: float,
    flops_per_perturbation: float,
    upload_bytes: float,
    cap: int,
    *,
    bytes_per_perturbation: float = 0.0,
) -> int:
    """The most forward-gradient perturbations, 0..cap, whose compute plus the upload meets the deadline.

    Like `max_local_steps`; with seed uploads each perturbation also adds a (seed, g, loss) triple to
    the payload, which `bytes_per_perturbation` accounts for (the upload is then
    upload_bytes + s * bytes_per_perturbation bytes).
    """
    return _max_units(profile, deadline_s, flops_per_perturbation, upload_bytes, cap, bytes_per_perturbation)


def select_clients(
    costs: dict[int, float],
    k: int,
    rng_or_seed: np.random.Generator | int | None = None,
    *,
    explore: float = 0.0,
) -> list[int]:
    """The k clients with the lowest expected cost (seconds or joules, as the caller chooses).

    Ties are broken by the lower client id, so the choice is deterministic; an infinite cost (a device
    that cannot meet the deadline) sorts last. Pure greedy selection starves slow devices forever, and
    their data with them: with `explore` > 0, floor(explore * k) of the k slots go to clients drawn
    uniformly (without replacement, from `rng_or_seed`, a Generator or a seed) among those the greedy
    part did not pick. The result is ordered by (cost, id).
    """
    if k < 0 or k > len(costs):
        raise ValueError(f"cannot select {k} clients out of {len(costs)}")
    if not 0.0 <= explore <= 1.0:
        raise ValueError(f"explore must be in [0, 1], got {explore}")
    if any(math.isnan(c) for c in costs.values()):
        raise ValueError("client costs must not be NaN")
    ranked = sorted(costs, key=lambda client: (costs[client], client))
    random_slots = math.floor(explore * k)
    chosen = ranked[: k - random_slots]
    if random_slots:
        if rng_or_seed is None:
            raise ValueError("explore > 0 needs rng_or_seed")
        rng = (
            rng_or_seed
            if isinstance(rng_or_seed, np.random.Generator)
            else np.random.Generator(np.random.PCG64(rng_or_seed))
        )
        rest = ranked[k - random_slots :]
        picks = rng.choice(len(rest), size=random_slots, replace=False)
        chosen += [rest[int(i)] for i in picks]
    return sorted(chosen, key=lambda client: (costs[client], client))


# --- device populations ---------------------------------------------------------------------------


def _linear_range(lo: float, hi: float, heterogeneity: float) -> tuple[float, float]:
    mid = (lo + hi) / 2
    half = (hi - lo) / 2 * heterogeneity
    return mid - half, mid + half


def _uniform(rng: np.random.Generator, lo: float, hi: float, heterogeneity: float) -> float:
    # Clipped so rounding in the centre/half-width arithmetic never leaves the configured range.
    return min(max(float(rng.uniform(*_linear_range(lo, hi, heterogeneity))), lo), hi)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, heterogeneity: float) -> float:
    value = math.exp(float(rng.uniform(*_linear_range(math.log(lo), math.log(hi), heterogeneity))))
    return min(max(value, lo), hi)


POPULATION_PRESETS: dict[str, dict[str, float]] = {
    # The field defaults below: a share of an LTE/5G broadband carrier, as wireless-FL papers simulate.
    "default": {},
    # The uplink-bound edge of a cellular IoT cell; compute and energy per FLOP as in "default", so
    # the two populations differ only in their uplinks.
    "cellular-edge": {
        "bandwidth_hz_min": 1.8e5,  # 1 LTE PRB (12 x 15 kHz): NB-IoT's carrier
        "bandwidth_hz_max": 1.08e6,  # 6 PRBs: an LTE-M (Cat-M1) narrowband
        "tx_power_w_min": 0.025,  # 14 dBm: UE power class 6 (NB-IoT, Rel-14)
        "tx_power_w_max": 0.2,  # 23 dBm: UE power class 3
        "path_loss_db_min": 125.0,  # 128.1 + 37.6 log10(0.8 km)
        "path_loss_db_max": 145.0,  # 2.8 km; beyond legacy LTE's 144 dB coupling-loss target
        "noise_psd_dbm_hz": -169.0,  # -174 dBm/Hz thermal + 5 dB base-station noise figure
    },
}
"""Named device populations: each is the field values it changes from the defaults."""


class DevicePopulation(_Strict):
    """A seeded distribution of devices.

    Per device: bandwidth, transmit power, path loss (in dB) and energy per FLOP are uniform in their
    ranges; compute speed is log-uniform (device speeds span orders of magnitude, so every decade is
    equally likely); fading is Rayleigh (|h|^2 exponential with mean 1, floored at `fading_floor`) or
    none (|h|^2 = 1). `heterogeneity` shrinks every range around its centre (arithmetic centre for
    uniform ranges, geometric for log-uniform ones): 1 uses the full ranges, 0 makes all devices
    identical up to fading. Each `*_min` must not exceed its `*_max`. `preset` names a population
    of `POPULATION_PRESETS` whose values replace the defaults; fields given explicitly still win.
    """

    preset: Literal["default", "cellular-edge"] = Field(
        "default",
        description="default: a share of an LTE/5G broadband carrier (the defaults below); cellular-edge: the "
        "uplink-bound edge of a cellular IoT cell (180 kHz-1.08 MHz, 14-23 dBm, 125-145 dB, N0 -169 dBm/Hz), whose "
        "values replace the defaults of the fields not given",
    )

    bandwidth_hz_min: float = Field(
        5e5, gt=0, le=1e10, allow_inf_nan=False, description="smallest uplink bandwidth drawn, Hz (uniform)"
    )
    bandwidth_hz_max: float = Field(
        2e6, gt=0, le=1e10, allow_inf_nan=False, description="largest uplink bandwidth drawn, Hz (>= the min)"
    )
    tx_power_w_min: float = Field(
        0.1, gt=0, le=100, allow_inf_nan=False, description="smallest transmit power drawn, W (uniform)"
    )
    tx_power_w_max: float = Field(
        0.2, gt=0, le=100, allow_inf_nan=False, description="largest transmit power drawn, W (>= the min)"
    )
    path_loss_db_min: float = Field(
        100.0, ge=0, le=250, allow_inf_nan=False, description="smallest path loss drawn, dB (uniform in dB)"
    )
    path_loss_db_max: float = Field(
        130.0, ge=0, le=250, allow_inf_nan=False, description="largest path loss drawn, dB (>= the min)"
    )
    fading: Literal["rayleigh", "none"] = Field("rayleigh", description="small-scale fading model")
    fading_floor: float = Field(
        1e-3,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="smallest |h|^2 drawn (-30 dB): a deeper fade than this is treated as this one, "
        "which keeps delays finite; such a device still misses any realistic deadline",
    )
    noise_psd_dbm_hz: float = Field(
        -174.0,
        ge=-250,
        le=0,
        allow_inf_nan=False,
        description="noise power spectral density N0 of every device, dBm/Hz",
    )
    flops_per_s_min: float = Field(
        5e10, gt=0, allow_inf_nan=False, description="slowest sustained compute speed drawn, FLOP/s (log-uniform)"
    )
    flops_per_s_max: float = Field(
        1e12, gt=0, allow_inf_nan=False, description="fastest sustained compute speed drawn, FLOP/s (>= the min)"
    )
    joules_per_flop_min: float = Field(
        1e-11, gt=0, allow_inf_nan=False, description="smallest energy per FLOP drawn, J/FLOP (uniform)"
    )
    joules_per_flop_max: float = Field(
        1e-10, gt=0, allow_inf_nan=False, description="largest energy per FLOP drawn, J/FLOP (>= the min)"
    )
    heterogeneity: float = Field(1.0, ge=0, le=1, description="0: identical devices; 1: the full ranges")

    memory_mb_min: float = Field(
        8192.0, gt=0, le=10_000_000, allow_inf_nan=False, description="smallest device memory, MB (log-uniform)"
    )
    memory_mb_max: float = Field(
        8192.0, gt=0, le=10_000_000, allow_inf_nan=False, description="largest device memory, MB (log-uniform)"
    )

    @model_validator(mode="before")
    @classmethod
    def _preset_values(cls, data: Any) -> Any:
        # An unknown or mistyped preset is left to the field's own validation, which names it.
        preset = data.get("preset", "default") if isinstance(data, dict) else None
        if isinstance(preset, str) and POPULATION_PRESETS.get(preset):
            return {**POPULATION_PRESETS[preset], **data}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> DevicePopulation:
        for name in ("bandwidth_hz", "tx_power_w", "path_loss_db", "flops_per_s", "joules_per_flop", "memory_mb"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if lo > hi:
                raise ValueError(f"{name}_min ({lo}) exceeds {name}_max ({hi})")
        return self

    def _fading(self, rng: np.random.Generator) -> float:
        draw = float(rng.exponential(1.0))  # always drawn, so "none" consumes the same stream
        return max(draw, self.fading_floor) if self.fading == "rayleigh" else 1.0

    def draw(self, num_clients: int, seed: int) -> list[DeviceProfile]:
        """Profiles for clients 0..num_clients-1, a pure function of (this population, num_clients, seed).

        One generator seeded from derive_seed("devices", seed) deals each client its fields in turn,
        so the first n profiles of a larger population are the n profiles of a smaller one.
        """
        if num_clients < 0:
            raise ValueError(f"num_clients must be >= 0, got {num_clients}")
        rng = np.random.Generator(np.random.PCG64(derive_seed("devices", seed)))
        h = self.heterogeneity
        profiles = []
        for _ in range(num_clients):
            # Keyword arguments are evaluated left to right: this is the order each client's draws are dealt.
            profiles.append(
                DeviceProfile(
                    bandwidth_hz=_uniform(rng, self.bandwidth_hz_min, self.bandwidth_hz_max, h),
                    tx_power_w=_uniform(rng, self.tx_power_w_min, self.tx_power_w_max, h),
                    path_loss_db=_uniform(rng, self.path_loss_db_min, self.path_loss_db_max, h),
                    fading=self._fading(rng),
                    noise_psd_dbm_hz=self.noise_psd_dbm_hz,
                    flops_per_s=_log_uniform(rng, self.flops_per_s_min, self.flops_per_s_max, h),
                    joules_per_flop=_uniform(rng, self.joules_per_flop_min, self.joules_per_flop_max, h),
                )
            )
        # Memory from a generator of its own, so adding it left every other draw as it was.
        memory = np.random.Generator(np.random.PCG64(derive_seed("device-memory", seed)))
        return [
            profile.model_copy(update={"memory_mb": _log_uniform(memory, self.memory_mb_min, self.memory_mb_max, h)})
            for profile in profiles
        ]

    def refade(self, profile: DeviceProfile, seed: int, client_id: int, round_index: int) -> DeviceProfile:
        """`profile` with a fresh small-scale fading draw for one round (block fading: |h|^2 is constant
        within a round and independent across rounds), from derive_seed("fading", seed, client, round).
        Path loss, power, bandwidth and hardware stay as they are."""
        rng = np.random.Generator(np.random.PCG64(derive_seed("fading", seed, client_id, round_index)))
        return profile.model_copy(update={"fading": self._fading(rng)})


class DevicesSpec(_Strict):
    """The devices of a job: an explicit profile per client, or a population to draw them from."""

    profiles: list[DeviceProfile] | None = Field(
        None,
        min_length=1,
        max_length=10_000,
        description="one profile per client, in client order (exactly num_clients of them); overrides the population",
    )
    population: DevicePopulation = Field(
        DevicePopulation(), description="the distribution each client's device is drawn from (without profiles)"
    )

    def profiles_for(self, num_clients: int, seed: int) -> list[DeviceProfile]:
        """Client i's profile at index i: the explicit list (which must have exactly num_clients entries),
        else `population.draw(num_clients, seed)`."""
        if self.profiles is None:
            return self.population.draw(num_clients, seed)
        if len(self.profiles) != num_clients:
            raise ValueError(
                f"devices.profiles lists {len(self.profiles)} profiles but the job has {num_clients} clients"
            )
        return list(self.profiles)


@functools.lru_cache(maxsize=64)
def _profiles(devices_json: str, num_clients: int, seed: int) -> tuple[DeviceProfile, ...]:
    return tuple(DevicesSpec.model_validate_json(devices_json).profiles_for(num_clients, seed))


def round_profile(devices: DevicesSpec, num_clients: int, seed: int, client: int, round_: int) -> DeviceProfile:
    """Client `client`'s device in round `round_`: its drawn profile with that round's fading.

    Explicit profiles are taken as given (their fading included); drawn ones get block fading,
    a fresh |h|^2 every round, so a device's link quality varies from round to round.
    """
    profile = _profiles(devices.model_dump_json(), num_clients, seed)[client]
    if devices.profiles is not None:
        return profile
    return devices.population.refade(profile, seed, client, round_)
