"""Which clients a round gets and how much work each task carries: seeded, deadline-aware.

The job's training mode says what a unit of work is (a step, a perturbation) and what it
costs; the wireless model says how long and how much energy a device needs for it.
"""

from __future__ import annotations

import numpy as np

from shared.catalog import model_info
from shared.modes import mode_of
from shared.seeding import derive_seed
from shared.spec import JobSpec
from shared.wireless import RoundCost, max_local_steps, round_cost, round_profile, select_clients


def sample_clients(spec: JobSpec, round_: int) -> list[int]:
    """The round's clients: seeded at random, or those with the lowest expected delay or energy."""
    if spec.budget.selection != "random":
        costs = {
            client: getattr(
                expected_cost(spec, round_, client), "total_s" if spec.budget.selection == "delay" else "total_j"
            )
            for client in range(spec.num_clients)
        }
        return sorted(select_clients(costs, spec.clients_per_round))
    rng = np.random.default_rng(derive_seed("sample", spec.seed, round_))
    chosen = rng.choice(spec.num_clients, size=spec.clients_per_round, replace=False)
    return sorted(int(c) for c in chosen)


def work_flops(spec: JobSpec) -> float:
    """FLOPs of one unit of local work (a backprop step, or one perturbation) at full sequence length."""
    return mode_of(spec).unit_flops(spec, model_info(spec.model).num_params, spec.batch_size * spec.max_length)


def expected_cost(spec: JobSpec, round_: int, client: int, upload_bytes: float = 0.0) -> RoundCost:
    profile = round_profile(spec.devices, spec.num_clients, spec.seed, client, round_)
    return round_cost(profile, work_flops(spec) * mode_of(spec).full_budget(spec), upload_bytes)


def task_budget(spec: JobSpec, round_: int, client: int, upload_bytes: float) -> int:
    """Units of local work for one device: all of it, or as much as meets the device deadline.

    Sized at full sequence length and with the previous round's upload size (0 before any), so a
    deadline budget is an upper estimate of the time a device needs; never below `budget.min_steps`.
    """
    cap = mode_of(spec).full_budget(spec)
    if spec.budget.kind == "fixed":
        return cap
    profile = round_profile(spec.devices, spec.num_clients, spec.seed, client, round_)
    fits = max_local_steps(profile, spec.budget.device_deadline_s, work_flops(spec), upload_bytes, cap)
    return max(min(spec.budget.min_steps, cap), fits)
