"""Local zeroth-order steps: the aggregator rebuilds each client's delta exactly from seeds and scalars."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared import data
from shared.adapters import build_peft_model
from shared.batches import collate
from shared.forward_grad import (
    ParamSpace,
    TrajectoryStep,
    UploadError,
    decode_pool,
    decode_trajectory,
    encode_pool,
    encode_trajectory,
    local_seed,
    replay_trajectory,
)
from shared.messages import CloseRound, InvalidMessage, RoundCommitted, UpdateReady, encode
from shared.models import initial_state, load_tokenizer, load_trainable_state, trainable_state
from shared.modes.base import UpdateRejected
from shared.modes.fwd import TrajectoryAccumulator, candidates_per_local_step, forward_local_steps, local_learning_rate
from shared.spec import JobSpec
from tests.conftest import TINY
from tests.test_aggregator import World, make_world, received  # noqa: F401 (make_world is a fixture)

LOCAL: dict[str, Any] = {
    "mode": "fwd",
    "fwd": {
        "regime": "local",
        "perturb": "all",
        "perturbations_per_local_step": 4,
        "max_perturbations_per_local_step": 8,
        "variance_control": "fixed",
        "discriminative": False,
        "local_lr": 0.05,
        "local_momentum": 0.5,
    },
}


def _spec(lora: dict[str, Any] | None = None, **fwd: Any) -> JobSpec:
    fields = {**TINY, **LOCAL, "local_steps": 8, "fwd": {**LOCAL["fwd"], **fwd}}
    if lora:
        fields["lora"] = {**TINY["lora"], **lora}
    return JobSpec.model_validate(fields)


def _model(spec: JobSpec, cache: Path) -> tuple[torch.nn.Module, Any]:
    model = build_peft_model(spec, cache)
    load_trainable_state(model, initial_state(model, 3))
    return model, load_tokenizer(spec.model, cache)


def _client_steps(
    spec: JobSpec, cache: Path, round_: int, steps: int
) -> tuple[dict[str, torch.Tensor], Any, dict[str, torch.Tensor]]:
    """Client 1's local steps from a fresh model: (trainable state before, the steps, state after)."""
    model, tokenizer = _model(spec, cache)
    before = trainable_state(model)
    examples = list(data.client_examples(spec, 1))
    result = forward_local_steps(
        model, tokenizer, examples, spec, "classification", round_=round_, client=1, wave=0, steps=steps
    )
    return before, result, trainable_state(model)


def _announce(spec: JobSpec, client: int, perturbations: int, key: str = "k", round_: int = 1) -> UpdateReady:
    return UpdateReady(
        job_id="job-abc", round=round_, client=client, attempt=0, key=key, num_samples=10, train_loss=1.0,
        compute_s=0.1, upload_bytes=1, perturbations=perturbations,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("steps", "fwd"),
    [
        (1, {}),
        (5, {}),
        (3, {"perturb": "head", "perturbations_per_local_step": 16, "max_perturbations_per_local_step": 16}),
        (4, {"variance_control": "adaptive", "variance_threshold": 1e-6}),  # every step runs to its cap
        (3, {"discriminative": True, "candidates": 3, "discriminative_every": 2}),
        (2, {"estimator": "jvp"}),
        (3, {"lora": {"target_modules": ["pooler.dense"]}}),  # pooler LoRA + head: encoder output cached
        (4, {"upload": "pool", "seed_pool": 40, "perturbations_per_local_step": 8}),
        (
            3,
            {
                "upload": "pool",
                "seed_pool": 30,
                "perturb": "head",
                "perturbations_per_local_step": 30,
                "max_perturbations_per_local_step": 30,
            },
        ),
    ],
)
def test_replayed_trajectory_equals_the_delta_the_client_applied(
    steps: int, fwd: dict[str, Any], tmp_path: Path
) -> None:
    spec = _spec(**fwd)
    model, tokenizer = _model(spec, tmp_path)
    examples = list(data.client_examples(spec, 1))
    before = trainable_state(model)
    result = forward_local_steps(
        model, tokenizer, examples, spec, "classification", round_=2, client=1, wave=0, steps=steps
    )
    after = trainable_state(model)
    assert len(result.steps) == steps or (fwd.get("upload") == "pool" and len(result.losses) == steps)
    if fwd.get("variance_control") == "adaptive":
        assert all(len(step) == 8 for step in result.steps)
    accumulator = TrajectoryAccumulator(spec, before)
    if result.coefficients is not None:
        blob = encode_pool(result.coefficients)
    else:
        blob = encode_trajectory(result.steps, result.losses)
    rebuilt = accumulator.validate(_announce(spec, 1, result.perturbations, round_=2), blob, 10**8)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved, "the local steps moved nothing"
    for name, delta in rebuilt.items():
        applied = after[name] - before[name]
        scale = float(applied.abs().max()) or 1.0
        assert torch.allclose(delta, applied, atol=1e-5 * scale, rtol=1e-4), name


def test_many_perturbations_give_a_step_along_the_true_gradient(tmp_path: Path) -> None:
    """P much larger than the perturbed dimension: the local step's direction matches autograd's gradient."""
    spec = _spec(perturb="head", perturbations_per_local_step=4096, max_perturbations_per_local_step=4096)
    spec = spec.model_copy(update={"fwd": spec.fwd.model_copy(update={"local_momentum": 0.0})})
    model, tokenizer = _model(spec, tmp_path)
    examples = list(data.client_examples(spec, 0))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    space = ParamSpace.from_state(params, "head")
    assert space.dim < 4096 / 10
    before = trainable_state(model)
    forward_local_steps(model, tokenizer, examples, spec, "classification", round_=1, client=0, wave=0, steps=1)
    step = space.flatten({name: trainable_state(model)[name] - before[name] for name in space.names})

    # The same minibatch through autograd, from the same starting point.
    load_trainable_state(model, before)
    from shared.batches import minibatches
    from shared.seeding import derive_seed

    positions = next(
        minibatches(range(len(examples)), spec.batch_size, derive_seed("fwd-local-batch", spec.seed, 1, 0, 0))
    )
    batch = collate(tokenizer, [examples[i] for i in positions], "classification", spec.max_length)
    model.eval()
    loss = model(**batch).loss
    loss.backward()
    gradient = space.flatten({name: params[name].grad for name in space.names})  # type: ignore[misc]
    cosine = float(torch.nn.functional.cosine_similarity(-step, gradient, dim=0))
    assert cosine > 0.9, cosine


def test_trajectory_upload_is_a_few_bytes_per_perturbation() -> None:
    steps = [TrajectoryStep(np.arange(16, dtype=np.uint32), np.full(16, 0.5, dtype=np.float16), 0.1)] * 50
    blob = encode_trajectory(steps, [1.0] * 50)
    assert len(blob) < 2 * 16 * 50 + 200  # float16 g; contiguous indices compress away


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s[:0], "outside 1..5"),
        (lambda s: s * 3, "outside 1..5"),
        (lambda s: [TrajectoryStep(np.array([0, 0], dtype=np.uint32), np.zeros(2, np.float16), 0.05)], "twice"),
        (lambda s: [TrajectoryStep(np.array([999], dtype=np.uint32), np.zeros(1, np.float16), 0.05)], "unknown seed"),
        (lambda s: [TrajectoryStep(np.array([0], dtype=np.uint32), np.array([np.nan], np.float16), 0.05)], "NaN"),
        (lambda s: [TrajectoryStep(np.arange(9, dtype=np.uint32), np.zeros(9, np.float16), 0.05)], "allowed"),
    ],
)
def test_malformed_trajectories_are_rejected(
    mutate: Callable[[list[TrajectoryStep]], list[TrajectoryStep]], message: str
) -> None:
    spec = _spec()
    good = [TrajectoryStep(np.arange(4, dtype=np.uint32), np.ones(4, np.float16), 0.05)] * 2
    blob = encode_trajectory(mutate(good), [1.0])
    with pytest.raises(UploadError, match=message):
        decode_trajectory(blob, max_steps=5, max_per_step=8, candidates_per_step=candidates_per_local_step(spec))


def test_pool_upload_is_two_bytes_per_pool_seed_and_checked() -> None:
    blob = encode_pool(np.full(1000, 0.25, dtype=np.float16))
    assert len(blob) < 2048  # 1,000 seeds, whatever the number of local steps, in under 2 KB
    assert decode_pool(blob, 1000).shape == (1000,)
    with pytest.raises(UploadError, match="coefficients for a pool"):
        decode_pool(encode_pool(np.zeros(999, dtype=np.float16)), 1000)
    with pytest.raises(UploadError, match="NaN"):
        decode_pool(encode_pool(np.array([np.nan] * 4, dtype=np.float16)), 4)
    with pytest.raises(UploadError):
        decode_pool(b"PWP1garbage", 4)


def test_garbage_trajectories_are_rejected() -> None:
    for blob in (b"", b"PWZ2", b"PWZ2" + b"\x00" * 10, b"nonsense"):
        with pytest.raises(UploadError):
            decode_trajectory(blob, max_steps=5, max_per_step=8, candidates_per_step=8)


def test_replay_is_deterministic_and_in_float64() -> None:
    steps = [TrajectoryStep(np.array([0, 2], dtype=np.uint32), np.array([0.5, -1.0], np.float16), 0.1)] * 3
    first = replay_trajectory(steps, lambda k, i: local_seed(1, 1, 0, 0, k, i), 20, momentum=0.9)
    again = replay_trajectory(steps, lambda k, i: local_seed(1, 1, 0, 0, k, i), 20, momentum=0.9)
    assert first.dtype == torch.float64 and torch.equal(first, again)


def test_discriminative_steps_move_and_replay_debiased(tmp_path: Path) -> None:
    """A steered local step's estimate is debiased along the previous step's (client and replay alike):
    the replay that skips the debiasing misses the client's delta, the one that applies it matches."""
    spec = _spec(discriminative=True, candidates=4, discriminative_every=1)
    before, result, after = _client_steps(spec, tmp_path, round_=2, steps=3)
    space = TrajectoryAccumulator(spec, before).space
    applied = space.flatten({name: after[name] - before[name] for name in space.names}).double()

    def seed_of(step: int, index: int) -> int:
        return local_seed(spec.seed, 2, 1, 0, step, index)

    debiased = replay_trajectory(result.steps, seed_of, space.dim, 0.5, lambda step: True)
    naive = replay_trajectory(result.steps, seed_of, space.dim, 0.5)
    scale = float(applied.abs().max())
    assert torch.allclose(debiased, applied, atol=1e-5 * scale, rtol=1e-4)
    assert float((naive - applied).abs().max()) > 1e-3 * scale


def test_malformed_trajectory_is_counted_and_the_round_commits_from_the_valid_ones(
    make_world: Callable[..., World],  # noqa: F811 (the fixture imported above)
) -> None:
    world = make_world(**LOCAL, local_steps=3)
    start = world.global_state(0)
    bad, *good = world.clients

    def announce(client: int, blob: bytes, perturbations: int) -> bytes:
        key = world.update_key(client)
        world.store.put(key, blob)
        digest = hashlib.sha256(blob).hexdigest()
        message = _announce(world.spec, client, perturbations, key=key).model_copy(
            update={"job_id": world.job_id, "digest": digest}
        )
        world.store.put(world.meta_key(client), encode(message))
        return encode(message)

    invalid_before = received("invalid")
    nan = [TrajectoryStep(np.arange(4, dtype=np.uint32), np.array([1, np.nan, 0, 0], np.float16), 0.05)]
    with pytest.raises(InvalidMessage, match="NaN"):
        world.aggregator.handle(announce(bad, encode_trajectory(nan, [1.0]), 4))
    assert received("invalid") == invalid_before + 1
    for client in good:
        steps = [TrajectoryStep(np.arange(4, dtype=np.uint32), np.full(4, 0.25 * (client + 1), np.float16), 0.05)] * 3
        world.aggregator.handle(announce(client, encode_trajectory(steps, [1.0] * 3), 12))
    world.aggregator.handle(encode(CloseRound(job_id=world.job_id, round=1, force=True)))
    [committed] = [e for e in world.events() if isinstance(e, RoundCommitted)]
    assert committed.clients == sorted(good)
    after = world.global_state(1)
    assert any(not torch.equal(start[name], after[name]) for name in start)


def test_the_cosine_schedule_decays_the_clients_learning_rate_over_the_rounds() -> None:
    spec = _spec(lr_schedule="cosine", local_lr=0.4, lr_min=0.1).model_copy(update={"rounds": 5})
    rates = [local_learning_rate(spec, round_) for round_ in range(1, 6)]
    # cosine from local_lr in round 1 to lr_min in the last: 0.1 + 0.15 (1 + cos(pi (r - 1) / 4))
    assert rates == pytest.approx([0.4, 0.1 + 0.15 * (1 + 2**-0.5), 0.25, 0.1 + 0.15 * (1 - 2**-0.5), 0.1])
    assert (
        local_learning_rate(spec.model_copy(update={"fwd": spec.fwd.model_copy(update={"lr_schedule": "constant"})}), 4)
        == 0.4
    )


@pytest.mark.parametrize("upload", ["seeds", "pool"])
def test_scheduled_steps_replay_exactly_and_a_stale_rate_is_refused(upload: str, tmp_path: Path) -> None:
    extra = {"seed_pool": 40, "perturbations_per_local_step": 8} if upload == "pool" else {}
    spec = _spec(lr_schedule="cosine", upload=upload, **extra).model_copy(update={"rounds": 4})
    before, result, after = _client_steps(spec, tmp_path, round_=3, steps=3)
    applied = {name: after[name] - before[name] for name in before}
    blob = (
        encode_pool(result.coefficients)
        if result.coefficients is not None
        else encode_trajectory(result.steps, result.losses)
    )
    rebuilt = TrajectoryAccumulator(spec, before).validate(
        _announce(spec, 1, result.perturbations, round_=3), blob, 10**8
    )
    for name, delta in rebuilt.items():
        scale = float(applied[name].abs().max()) or 1.0
        assert torch.allclose(delta, applied[name], atol=1e-5 * scale, rtol=1e-4), name
    if upload == "seeds":
        assert {step.lr for step in result.steps} == {local_learning_rate(spec, 3)} != {spec.fwd.local_lr}
        stale = [TrajectoryStep(step.indices, step.grads, spec.fwd.local_lr) for step in result.steps]
        with pytest.raises(UpdateRejected, match="learning rate"):
            TrajectoryAccumulator(spec, before).validate(
                _announce(spec, 1, result.perturbations, round_=3), encode_trajectory(stale, result.losses), 10**8
            )
