"""FwdLLM math: the estimator, seeds, discriminative sampling, uploads, and fd vs jvp."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import data
from shared.adapters import build_peft_model
from shared.codec import decode_tensors
from shared.forward_grad import (
    ForwardGradientEstimate,
    ParamSpace,
    UploadError,
    candidate_seed,
    debias_along,
    decode_seed_scalars,
    direction,
    encode_seed_scalars,
    half_of,
    select_directions,
    validate_upload,
)
from shared.forward_passes import LossOf
from shared.forward_passes import central_difference as _central_difference
from shared.forward_passes import jvp_derivative as _jvp
from shared.messages import UpdateReady
from shared.models import initial_state, load_tokenizer, load_trainable_state, trainable_state
from shared.modes.fwd import GRADIENT, ForwardAccumulator, forward_task
from shared.spec import JobSpec, parse_spec


def test_averaged_estimate_converges_to_the_true_gradient_of_a_quadratic() -> None:
    dim = 50
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(dim, dim, generator=rng)
    hessian = a @ a.T / dim + torch.eye(dim)
    theta = torch.randn(dim, generator=rng)

    def loss(x: torch.Tensor) -> float:
        return float(0.5 * x @ hessian @ x)

    true_gradient = hessian @ theta
    estimate = ForwardGradientEstimate(dim)
    h = 1e-3
    cosines = []
    for index in range(4000):
        v = direction(candidate_seed(1, 1, 0, 0, index), dim)
        g = (loss(theta + h * v) - loss(theta - h * v)) / (2 * h)
        estimate.add(g, v, half_of(0, index))
        if index + 1 in (50, 4000):
            cosines.append(float(torch.nn.functional.cosine_similarity(estimate.mean(), true_gradient, dim=0)))
    assert cosines[-1] > 0.9
    assert cosines[-1] > cosines[0]  # more perturbations, better estimate
    assert estimate.variance_ratio() < 0.1


def test_variance_ratio_falls_as_perturbations_accumulate() -> None:
    dim = 200
    gradient = torch.randn(dim, generator=torch.Generator().manual_seed(3))
    estimate = ForwardGradientEstimate(dim)
    ratios = []
    for index in range(2000):
        v = direction(candidate_seed(2, 1, 0, 0, index), dim)
        estimate.add(float(gradient @ v), v, half_of(0, index))
        if index + 1 in (20, 200, 2000):
            ratios.append(estimate.variance_ratio())
    assert ratios[0] > ratios[1] > ratios[2]
    assert ForwardGradientEstimate(dim).variance_ratio() == 1.0  # no evidence yet


def test_directions_regenerate_exactly_from_their_seed() -> None:
    seed = candidate_seed(7, 3, 2, 1, 42)
    assert seed == candidate_seed(7, 3, 2, 1, 42)
    assert seed != candidate_seed(7, 3, 2, 1, 43) != candidate_seed(7, 3, 2, 0, 42)
    assert torch.equal(direction(seed, 1000), direction(seed, 1000))


@pytest.mark.parametrize("candidates", [37, 999, 1000, 1001, 2500])
def test_discriminative_sampling_keeps_the_top_k_by_cosine(candidates: int) -> None:
    dim, keep = 64, 12
    reference = torch.randn(dim, generator=torch.Generator().manual_seed(candidates))
    seeds = [candidate_seed(0, 1, 0, 0, i) for i in range(candidates)]
    chosen, cosines = select_directions(seeds, dim, reference, keep, chunk=1000)
    brute = [float(torch.nn.functional.cosine_similarity(direction(s, dim), reference, dim=0)) for s in seeds]
    best = sorted(range(candidates), key=lambda i: (-abs(brute[i]), i))[:keep]
    assert chosen == sorted(best)
    assert cosines == pytest.approx([brute[i] for i in chosen], abs=1e-5)
    # Every chunk competes, not just the last one.
    if candidates > 1000:
        assert min(chosen) < 1000 or max(abs(brute[i]) for i in range(1000)) < min(abs(c) for c in cosines)


def test_small_chunks_choose_the_same_as_one_big_chunk() -> None:
    dim, keep = 32, 5
    reference = torch.randn(dim, generator=torch.Generator().manual_seed(9))
    seeds = [candidate_seed(0, 2, 1, 0, i) for i in range(300)]
    small_chunks = select_directions(seeds, dim, reference, keep, chunk=7)
    one_chunk = select_directions(seeds, dim, reference, keep, chunk=300)
    assert small_chunks[0] == one_chunk[0]
    assert small_chunks[1] == pytest.approx(one_chunk[1], abs=1e-6)


def test_without_a_reference_the_first_candidates_are_used() -> None:
    seeds = [candidate_seed(0, 1, 0, 0, i) for i in range(30)]
    assert select_directions(seeds, 8, None, 3)[0] == [0, 1, 2]


def test_debiasing_removes_discriminative_samplings_stretch_along_the_reference() -> None:
    """Keeping the 4 of 40 candidates most aligned with a reference stretches mean_i (g . v_i) v_i along
    it about 4x; dividing that component by the kept directions' mean (v . r)^2 gives the gradient back
    (averaged over many draws), while orthogonal to the reference nothing changes."""
    dim, candidates, keep, trials = 30, 40, 4, 6000
    generator = torch.Generator().manual_seed(7)
    gradient = torch.randn(dim, generator=generator, dtype=torch.float64)
    reference = gradient + 0.8 * torch.randn(dim, generator=generator, dtype=torch.float64)
    unit = reference / reference.norm()
    biased_sum = torch.zeros(dim, dtype=torch.float64)
    debiased_sum = torch.zeros(dim, dtype=torch.float64)
    stretch = 0.0
    for _ in range(trials):
        v = torch.randn(candidates, dim, generator=generator, dtype=torch.float64)
        kept = v[((v @ unit).abs() / v.norm(dim=1)).topk(keep).indices]
        estimate = (kept @ gradient) @ kept / keep
        alignment = float(((kept @ unit) ** 2).mean())
        stretch += alignment / trials
        biased_sum += estimate / trials
        debiased_sum += debias_along(estimate, reference, alignment) / trials
    along = float(gradient @ unit)
    assert stretch > 3.0
    assert float(biased_sum @ unit) > 2.5 * along
    assert float(debiased_sum @ unit) == pytest.approx(along, rel=0.1)
    assert float((debiased_sum - gradient).norm()) < 0.2 * float(gradient.norm())
    # Orthogonal to the reference the debiasing changes nothing.
    across = biased_sum - (biased_sum @ unit) * unit
    assert torch.allclose(debiased_sum - (debiased_sum @ unit) * unit, across, atol=1e-9)
    # Without a reference, or with unselected directions (a = 1), the estimate is left as it is.
    assert torch.equal(debias_along(gradient, torch.zeros(dim, dtype=torch.float64), 2.0), gradient)
    assert torch.allclose(debias_along(gradient, reference, 1.0), gradient)


def test_seed_scalar_upload_is_under_a_kilobyte_for_64_perturbations() -> None:
    blob = encode_seed_scalars(range(0, 640, 10), np.linspace(-1, 1, 64), np.full(64, 1.5))
    assert len(blob) <= 1024
    upload = decode_seed_scalars(blob)
    assert upload.indices.tolist() == list(range(0, 640, 10))
    validate_upload(upload, expected_count=64, candidate_count=640)


@pytest.mark.parametrize(
    ("indices", "grads", "count", "message"),
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], 4, "expected 4"),
        ([0, 1, 2, 99], [0.1, 0.2, 0.3, 0.4], 4, "unknown seed"),
        ([0, 1, 1, 2], [0.1, 0.2, 0.3, 0.4], 4, "twice"),
    ],
)
def test_malformed_uploads_are_rejected(indices: list[int], grads: list[float], count: int, message: str) -> None:
    upload = decode_seed_scalars(encode_seed_scalars(indices, grads, [1.0] * len(indices)))
    with pytest.raises(UploadError, match=message):
        validate_upload(upload, expected_count=count, candidate_count=40)


def test_nan_and_garbage_uploads_are_rejected() -> None:
    with pytest.raises(UploadError, match="NaN"):
        decode_seed_scalars(encode_seed_scalars([0, 1], [0.1, math.nan], [1.0, 1.0]))
    with pytest.raises(UploadError):
        decode_seed_scalars(b"\x00garbage")


# -- against a real (tiny) model --------------------------------------------------------------


def _tiny_fwd_spec(**fwd: object) -> JobSpec:
    return parse_spec(
        {
            "model": "tiny-bert",
            "dataset": "bbc-news",
            "mode": "fwd",
            "num_clients": 4,
            "clients_per_round": 2,
            "batch_size": 4,
            "max_length": 32,
            "seed": 5,
            "fwd": {"perturbations_per_task": 6, "candidates": 4, "discriminative": True, **fwd},
        }
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, torch.nn.Module, object, Path]:
    cache = tmp_path_factory.mktemp("cache")
    spec = _tiny_fwd_spec()
    model = build_peft_model(spec, cache)
    load_trainable_state(model, initial_state(model, 11))
    return spec, model, load_tokenizer(spec.model, cache), cache


def test_fd_and_jvp_agree_on_a_small_model(tmp_path: Path) -> None:
    spec = _tiny_fwd_spec(estimator="jvp")
    model = build_peft_model(spec, tmp_path)  # eager attention, as jvp needs
    load_trainable_state(model, initial_state(model, 11))
    tokenizer = load_tokenizer(spec.model, tmp_path)
    from shared.batches import collate

    batch = collate(tokenizer, list(data.client_examples(spec, 0))[:4], "classification", 32)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    space = ParamSpace.from_state(params)
    module = LossOf(model, "classification")
    model.eval()
    before = trainable_state(model)
    for index in range(3):
        v = direction(candidate_seed(5, 1, 0, 0, index), space.dim)
        g_fd, loss_fd = _central_difference(module, batch, params, space, v, 1e-3)
        g_jvp, loss_jvp = _jvp(module, batch, params, space, v, 1e-3)
        assert g_fd == pytest.approx(g_jvp, rel=2e-2, abs=2e-3)
        assert loss_fd == pytest.approx(loss_jvp, rel=1e-4)
    after = trainable_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "fd must restore the parameters exactly"


def test_aggregator_regenerates_the_workers_directions(tiny: tuple[JobSpec, torch.nn.Module, object, Path]) -> None:
    """The estimate rebuilt from (seed, g) equals the dense sum the worker computed itself."""
    spec, model, tokenizer, _ = tiny
    examples = list(data.client_examples(spec, 1))
    start = trainable_state(model)
    reference = torch.randn(ParamSpace.from_state(start).dim, generator=torch.Generator().manual_seed(1))
    common = {"round_": 2, "client": 1, "wave": 0, "perturbations": 6, "reference": reference}
    seeds_result = forward_task(model, tokenizer, examples, spec, "classification", **common)  # type: ignore[arg-type]
    dense_spec = spec.model_copy(update={"fwd": spec.fwd.model_copy(update={"upload": "dense"})})
    dense_result = forward_task(model, tokenizer, examples, dense_spec, "classification", **common)  # type: ignore[arg-type]
    assert len(seeds_result.payload) < 200 < len(dense_result.payload)

    announce = UpdateReady(
        job_id="job-abc", round=2, client=1, attempt=0, key="k", num_samples=len(examples), train_loss=1.0,
        compute_s=0.1, upload_bytes=len(seeds_result.payload), perturbations=6,
    )  # fmt: skip
    accumulator = ForwardAccumulator(spec, start)
    accumulator.merge(announce, accumulator.validate(announce, seeds_result.payload, 10**8))
    rebuilt = accumulator.estimate.total
    dense = ParamSpace.from_state(start).flatten(decode_tensors(dense_result.payload))
    # fp16 on the dense wire: compare at that precision.
    assert torch.allclose(rebuilt.float(), dense, rtol=2e-3, atol=2e-3 * float(dense.abs().max()))
    assert seeds_result.cosine > 0  # chosen against a reference gradient


def test_discriminative_rounds_commit_the_debiased_estimate(
    tiny: tuple[JobSpec, torch.nn.Module, object, Path],
) -> None:
    """Tasks that steered by the previous round's gradient stretch the round's estimate along it; the
    commit divides that component by the kept directions' mean (v . r)^2 and keeps the rest as merged.
    Round 1 (no reference was given out) commits the plain mean."""
    spec, model, tokenizer, _ = tiny
    start = trainable_state(model)
    space = ParamSpace.from_state(start)
    reference = torch.randn(space.dim, generator=torch.Generator().manual_seed(2))
    result = forward_task(
        model, tokenizer, list(data.client_examples(spec, 1)), spec, "classification",  # type: ignore[arg-type]
        round_=2, client=1, wave=0, perturbations=6, reference=reference,
    )  # fmt: skip
    announce = UpdateReady(
        job_id="job-abc", round=2, client=1, attempt=0, key="k", num_samples=8, train_loss=1.0,
        compute_s=0.1, upload_bytes=len(result.payload), perturbations=6,
    )  # fmt: skip

    def commit(round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        accumulator = ForwardAccumulator(spec, start)
        accumulator.merge(announce, accumulator.validate(announce, result.payload, 10**8))
        previous = {GRADIENT: space.unflatten(reference)}
        step = accumulator.commit(dict(start), previous.get, round_)
        return space.flatten(step.artifacts[GRADIENT]), accumulator.estimate.mean()

    debiased, plain = commit(2)
    unit = reference / reference.norm()
    kept = [
        direction(candidate_seed(spec.seed, 2, 1, 0, i), space.dim)
        for i in decode_seed_scalars(result.payload).indices.tolist()
    ]
    alignment = float(torch.stack([(v @ unit) ** 2 for v in kept]).mean())
    assert alignment > 1.5  # the top 6 of 24 candidates by |cosine|
    assert float(debiased @ unit) == pytest.approx(float(plain @ unit) / alignment, rel=1e-4, abs=1e-7)
    across = plain - (plain @ unit) * unit
    assert torch.allclose(debiased - (debiased @ unit) * unit, across, atol=1e-6)
    first, plain_first = commit(1)
    assert torch.equal(first, plain_first)
