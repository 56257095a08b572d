"""Secure aggregation: the library (masks, Shamir, encrypted shares, dropout recovery) and tiny-bert jobs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.aggregator.aggregator import Aggregator
from services.embedded import EmbeddedCluster
from services.scheduler.core import sample_clients
from services.worker.worker import Worker
from shared import secagg
from shared.codec import decode_tensors
from shared.messages import MoreWork, RoundCommitted, TrainTask, UpdateReady, decode_scheduler, decode_task, encode
from shared.modes.secure import _flatten, _pack, _unpack
from shared.spec import JobSpec, SpecError, parse_spec
from shared.store import Keys
from tests.conftest import TINY
from tests.harness import drain
from tests.test_aggregator import World, assert_states_close, make_world, received, weighted_step

__all__ = ["make_world"]  # a fixture this module uses

BITS = 32
CONTEXT = secagg.round_context("job-x", 3)


def _clients(n: int, d: int, seed: int = 0) -> tuple[dict[int, secagg.ClientKeys], dict[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {i: secagg.ClientKeys.generate() for i in range(n)}, {i: rng.normal(0, 0.05, d) for i in range(n)}


def _secure_sum(
    xs: dict[int, np.ndarray], keys: dict[int, secagg.ClientKeys], survivors: list[int], revealers: list[int], t: int
) -> tuple[np.ndarray, dict[int, np.ndarray], float]:
    """The whole protocol in memory: every client masks and shares; `survivors` upload; `revealers` unmask."""
    public = {i: k.public() for i, k in keys.items()}
    scale = secagg.fixed_point_scale(BITS, 1.0, len(xs))
    masked, sealed = {}, {}
    for i, x in xs.items():
        seed = os.urandom(32)
        values = secagg.encode_fixed(x, scale, 1.0, 1.0, BITS)
        masked[i] = secagg.mask_vector(values, BITS, i, keys[i], public, seed, CONTEXT)
        sealed[i] = secagg.share_secrets(i, keys[i], seed, public, t, CONTEXT)
    total = np.zeros(len(xs[0]), dtype=np.uint64)
    for i in survivors:
        total += masked[i].astype(np.uint64)
    reveals = {
        j: secagg.reveal(j, keys[j], {i: sealed[i][j] for i in xs}, public, survivors, CONTEXT) for j in revealers
    }
    plain = secagg.unmask(total, BITS, public, survivors, reveals, t, CONTEXT)
    return secagg.decode_fixed(plain, scale, BITS), masked, scale


def test_secure_sum_equals_plain_sum_without_dropout() -> None:
    keys, xs = _clients(5, 1000)
    got, _, scale = _secure_sum(xs, keys, survivors=list(range(5)), revealers=[0, 2, 4], t=3)
    want = sum(xs.values())
    # Each client's fixed-point rounding is at most half a unit.
    assert np.abs(got - want).max() <= 5 * 0.5 / scale
    assert np.abs(got - want).max() < 1e-8


def test_secure_sum_recovers_a_dropped_clients_masks() -> None:
    keys, xs = _clients(5, 1000, seed=1)
    survivors = [0, 1, 3, 4]  # client 2 advertised keys and shared its secrets, then never uploaded
    got, _, scale = _secure_sum(xs, keys, survivors=survivors, revealers=[1, 3, 4], t=3)
    assert np.abs(got - sum(xs[i] for i in survivors)).max() <= 4 * 0.5 / scale


def test_too_few_reveals_cannot_unmask() -> None:
    keys, xs = _clients(4, 10, seed=2)
    with pytest.raises(secagg.SecAggError, match="2 shares revealed, 3 needed"):
        _secure_sum(xs, keys, survivors=[0, 1, 2, 3], revealers=[0, 1], t=3)


def test_a_masked_update_reveals_nothing_of_the_plain_one() -> None:
    keys, xs = _clients(3, 20_000, seed=3)
    _, masked, scale = _secure_sum(xs, keys, survivors=[0, 1, 2], revealers=[0, 1, 2], t=2)
    plain = secagg.encode_fixed(xs[0], scale, 1.0, 1.0, BITS)
    upload = masked[0].astype(np.uint64)
    assert not np.any(upload == plain)
    # Uniform over Z_2^32: mean 2^31 and each of 16 buckets ~1/16 (the plain values sit near 0 and 2^32).
    assert abs(upload.mean() / 2**31 - 1) < 0.02
    buckets = np.bincount((upload >> np.uint64(28)).astype(np.int64), minlength=16) / upload.size
    assert np.all(np.abs(buckets - 1 / 16) < 0.01)
    decoded = secagg.decode_fixed(upload, scale, BITS)
    assert abs(np.corrcoef(decoded, xs[0])[0, 1]) < 0.05


def test_shamir_any_t_of_n_rebuild_and_fewer_do_not() -> None:
    secret = os.urandom(32)
    shares = secagg.shamir_split(secret, list(range(6)), 4)
    assert secagg.shamir_combine({c: shares[c] for c in (5, 0, 3, 2)}, 4) == secret
    with pytest.raises(secagg.SecAggError):
        secagg.shamir_combine({c: shares[c] for c in (0, 1, 2)}, 4)
    wrong = {c: shares[c] for c in (0, 1, 2, 3)} | {3: shares[3] + 1}
    assert secagg.shamir_combine({c: wrong[c] for c in (0, 1, 2, 3)}, 4) != secret or False


def test_shares_open_only_for_their_recipient() -> None:
    keys = {i: secagg.ClientKeys.generate() for i in range(3)}
    public = {i: k.public() for i, k in keys.items()}
    sealed = secagg.share_secrets(0, keys[0], os.urandom(32), public, 2, CONTEXT)
    secagg.open_share(1, keys[1], 0, public[0], sealed[1], CONTEXT)
    with pytest.raises(secagg.SecAggError, match="fails authentication"):
        secagg.open_share(2, keys[2], 0, public[0], sealed[1], CONTEXT)
    with pytest.raises(secagg.SecAggError, match="fails authentication"):  # bound to job and round
        secagg.open_share(1, keys[1], 0, public[0], sealed[1], secagg.round_context("job-x", 4))


def test_fixed_point_round_trip_and_overflow_bound() -> None:
    values = np.array([-1.5, -0.25, 0.0, 0.125, 0.9, 3.0])
    scale = secagg.fixed_point_scale(16, 1.0, 4)
    back = secagg.decode_fixed(secagg.encode_fixed(values, scale, 1.0, 1.0, 16), scale, 16)
    assert np.abs(back - np.clip(values, -1, 1)).max() <= 0.5 / scale
    # Four clients at the clip bound, weight 1 each: the sum stays representable.
    total = sum(secagg.encode_fixed(np.array([-1.0, 1.0]), scale, 1.0, 1.0, 16) for _ in range(4))
    assert list(secagg.decode_fixed(total, scale, 16)) == [-4.0, 4.0]
    with pytest.raises(secagg.SecAggError, match="cannot hold"):
        secagg.fixed_point_scale(16, 1e6, 1e4)


def test_spec_rejects_strategies_that_read_individual_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    base: dict[str, Any] = {**TINY, "secure_aggregation": {"enabled": True}}
    assert parse_spec(base).secure_aggregation.bits == 32
    # As if fedavg were a strategy that reads each update (median, Krum): the combination is refused.
    monkeypatch.setattr("shared.spec.SUMMING_STRATEGIES", frozenset({"some-summing-strategy"}))
    with pytest.raises(SpecError, match=r"aggregation\.strategy 'fedavg' needs them"):
        parse_spec(base)
    monkeypatch.undo()
    with pytest.raises(SpecError, match="mode 'fwd' is not supported"):
        parse_spec({**base, "mode": "fwd"})
    with pytest.raises(SpecError, match="clients_per_round >= 2"):
        parse_spec({**base, "clients_per_round": 1})
    with pytest.raises(SpecError, match="bits"):
        parse_spec({**base, "secure_aggregation": {"enabled": True, "bits": 8}})


# -- whole jobs ----------------------------------------------------------------------------------


def _run(spec: JobSpec, cache_dir: Path, drop: Callable[[TrainTask], bool] | None = None) -> dict[str, Any]:
    cluster = EmbeddedCluster(cache_dir, workers=1)
    if drop is not None:  # before the workers start consuming
        for worker in cluster.workers:
            _drop_tasks(worker, drop)
    with cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, poll_s=0.05)
        blob = cluster.store.get(Keys().global_state(job_id, spec.rounds))
    assert job["state"] == "succeeded", job["error"]
    assert blob is not None
    return {"job": job, "state": decode_tensors(blob)}


def _drop_tasks(worker: Worker, drop: Callable[[TrainTask], bool]) -> None:
    """A device that goes offline: the task is taken off the queue and never answered."""
    handle = worker.handle

    def maybe(body: bytes) -> None:
        task = decode_task(body, worker.max_message_bytes, worker.auth)
        if isinstance(task, TrainTask) and drop(task):
            return
        handle(body)

    worker.handle = maybe  # type: ignore[method-assign]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_secure_job_equals_the_unmasked_run(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> None:
    plain = _run(tiny_spec(), cache_dir)
    spec = tiny_spec(secure_aggregation={"enabled": True})
    secure = _run(spec, cache_dir)
    last = secure["job"]["metrics"][-1]
    assert last["secagg_survivors"] == spec.clients_per_round and last["secagg_dropped"] == 0
    assert last["updates"] == 4 * spec.clients_per_round  # advertise, share, mask, unmask
    assert "secagg_survivors" not in plain["job"]["metrics"][-1]
    # The same training and codec; only the fixed-point rounding (2^-24 or finer here) differs.
    assert _max_diff(secure["state"], plain["state"]) < 1e-6


@pytest.fixture(scope="module")
def dropout_reference(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> dict[str, Any]:
    """The unmasked run in which the first client sampled in round 2 never answers its round-2 task."""
    spec = tiny_spec(**DROPOUT)
    gone = sample_clients(spec, 2)[0]
    return {"gone": gone, **_run(spec, cache_dir, drop=lambda t: t.round == 2 and t.client == gone)}


DROPOUT: dict[str, Any] = {"quorum": 0.5, "round_deadline_s": 6.0, "rounds": 2}


@pytest.mark.parametrize(("wave", "shared", "dropped"), [(1, 2, 0), (2, 3, 1)], ids=["before-sharing", "after-sharing"])
def test_a_dropped_client_leaves_the_sum_of_the_others(
    tiny_spec: Callable[..., JobSpec],
    cache_dir: Path,
    dropout_reference: dict[str, Any],
    wave: int,
    shared: int,
    dropped: int,
) -> None:
    """The client advertises its keys in round 2, then never answers its wave-1 (share) or wave-2 (mask)
    task. After sharing, its pairwise masks stay in the others' uploads and are removed with its
    mask key, rebuilt from the survivors' shares; the round commits the sum of the other two."""
    gone = dropout_reference["gone"]
    spec = tiny_spec(**DROPOUT, secure_aggregation={"enabled": True})
    secure = _run(spec, cache_dir, drop=lambda t: t.round == 2 and t.wave == wave and t.client == gone)
    last = secure["job"]["metrics"][-1]
    assert last["secagg_advertised"] == spec.clients_per_round
    assert last["secagg_shared"] == shared and last["secagg_dropped"] == dropped
    assert last["secagg_survivors"] == spec.clients_per_round - 1
    assert last["clients"] == sorted(set(sample_clients(spec, 2)) - {gone})  # the sum's clients
    assert _max_diff(secure["state"], dropout_reference["state"]) < 1e-6


@pytest.mark.timeout(120)  # the bug this guards against hangs
def test_a_wave_that_brings_nothing_ends_the_round_instead_of_hanging(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path
) -> None:
    """Every client of round 2 drops after sharing: nothing was masked, so nothing can be summed; the
    round commits the previous state (it does not ask for the same wave forever) and the job ends."""
    spec = tiny_spec(**DROPOUT, secure_aggregation={"enabled": True})
    cluster = EmbeddedCluster(cache_dir, workers=1)
    _drop_tasks(cluster.workers[0], lambda t: t.round == 2 and t.wave == 2)
    with cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, poll_s=0.05)
        states = [cluster.store.get(Keys().global_state(job_id, r)) for r in (1, 2)]
    assert job["state"] == "succeeded", job["error"]
    assert job["metrics"][-1]["secagg_survivors"] == 0 and job["metrics"][-1]["secagg_shared"] == 3
    assert states[0] is not None and states[0] == states[1]


# -- the aggregator's side, step by step ---------------------------------------------------------


def _upload(world: World, client: int, wave: int, payload: bytes, num_samples: int) -> bytes:
    """Store an upload and its announcement as a worker would; returns the UpdateReady body."""
    key = world.update_key(client, wave=wave)
    world.store.put(key, payload)
    message = encode(
        UpdateReady(
            job_id=world.job_id,
            round=1,
            client=client,
            wave=wave,
            attempt=0,
            key=key,
            digest=hashlib.sha256(payload).hexdigest(),
            num_samples=num_samples,
            train_loss=1.0,
            compute_s=0.1,
            upload_bytes=len(payload),
        )
    )
    world.store.put(world.meta_key(client, wave=wave), message)
    return message


def _pump(world: World, aggregator: Aggregator) -> list[object]:
    """Deliver events to the scheduler and control messages to the aggregator until both are quiet."""
    seen: list[object] = []
    while True:
        events = drain(world.bus, world.queues.events)
        controls = drain(world.bus, world.queues.aggregate)
        drain(world.bus, world.queues.tasks)
        if not events and not controls:
            return seen
        for body in events:
            seen.append(decode_scheduler(body))
            world.scheduler.handle_event(body)
        for body in controls:
            aggregator.handle(body)


def test_the_aggregator_sees_only_masked_vectors_drops_late_waves_and_rebuilds_after_a_restart(
    make_world: Callable[..., World],
) -> None:
    world = make_world(quorum=0.5, secure_aggregation={"enabled": True})
    spec, context = world.spec, secagg.round_context(world.job_id, 1)
    settings = spec.secure_aggregation
    live, late = sorted(world.clients[:2]), world.clients[2]
    weights = {c: 10 + 7 * c for c in world.clients}
    previous = world.global_state(0)
    names = sorted(previous)
    deltas = {c: world.delta(c) for c in live}
    keys = {c: secagg.ClientKeys.generate() for c in world.clients}
    public = {c: k.public() for c, k in keys.items()}

    # Wave 0: two clients advertise; the third misses the deadline.
    for c in live:
        advert = {"phase": "advertise", "enc": public[c].enc, "mask": public[c].mask, "weight": float(weights[c])}
        world.aggregator.handle(_upload(world, c, 0, _pack(advert), weights[c]))
    world.scheduler.jobs.update_plan(world.job_id, 1, deadline_at=0.0)
    world.scheduler.tick()
    assert any(isinstance(e, MoreWork) and e.wave == 1 for e in _pump(world, world.aggregator))
    # Its advertisement arrives after wave 1 went out: the sets the clients build on are fixed.
    before = received("late")
    advert = {"phase": "advertise", "enc": public[late].enc, "mask": public[late].mask, "weight": 1.0}
    world.aggregator.handle(_upload(world, late, 0, _pack(advert), weights[late]))
    assert received("late") == before + 1

    # Wave 1: shares among U1; wave 2: masked vectors; wave 3: reveals. The late client abstains.
    seeds = {c: os.urandom(32) for c in live}
    u1 = {c: public[c] for c in live}
    sealed = {c: secagg.share_secrets(c, keys[c], seeds[c], u1, 2, context) for c in live}
    scale = secagg.fixed_point_scale(settings.bits, settings.clip, sum(weights[c] for c in live))
    plain = {
        c: secagg.encode_fixed(_flatten(deltas[c], names), scale, settings.clip, weights[c], settings.bits)
        for c in live
    }
    masked = {c: secagg.mask_vector(plain[c], settings.bits, c, keys[c], u1, seeds[c], context) for c in live}
    waves = {
        1: {c: {"phase": "shares", "u1": live, "shares": sealed[c]} for c in live},
        2: {c: {"phase": "masked", "u2": live, "masked": masked[c].tobytes()} for c in live},
        3: {
            c: {
                "phase": "reveal",
                "u3": live,
                "mask_key": {},
                "b": {s: secagg.share_bytes(v) for s, v in r["b"].items()},
            }
            for c in live
            for r in [secagg.reveal(c, keys[c], {s: sealed[s][c] for s in live}, u1, live, context)]
        },
    }
    aggregator = world.aggregator
    for wave in (1, 2, 3):
        if wave == 3:
            # What the aggregator stored and read of each client is indistinguishable from noise.
            for c in live:
                upload = _unpack(world.store.get(world.update_key(c, wave=2)) or b"")["masked"]
                assert not np.any(np.frombuffer(upload, np.uint32).astype(np.uint64) == plain[c])
            # A restarted aggregator rebuilds the round from the store (uploads sorted by client, not by wave).
            aggregator = Aggregator(world.bus, world.store, cache_dir=world.cache_dir)
        for c in world.clients:
            message = waves[wave].get(c, {"phase": "abstain"})
            aggregator.handle(_upload(world, c, wave, _pack(message), weights[c]))
        events = _pump(world, aggregator)
    [committed] = [e for e in events if isinstance(e, RoundCommitted)]
    assert committed.metrics["secagg_survivors"] == 2 and committed.metrics["secagg_advertised"] == 2
    expected = weighted_step(previous, [deltas[c] for c in live], [float(weights[c]) for c in live])
    assert_states_close(world.global_state(1), expected, atol=1e-6)
