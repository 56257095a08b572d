"""Streaming weighted FedAvg against a direct torch reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from shared.aggregation import StreamingMean, apply_update

SHAPES = {"lora_A": (8, 32), "lora_B": (32, 8), "head.weight": (5, 32), "head.bias": (5,)}


def _updates(count: int, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    g = torch.Generator().manual_seed(seed)
    updates = [
        {name: torch.randn(shape, generator=g) * 10 ** (i % 3 - 1) for name, shape in SHAPES.items()}
        for i in range(count)
    ]
    weights = (torch.rand(count, generator=g, dtype=torch.float64) * 100 + 0.5).tolist()
    return updates, weights


def _reference(updates: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    w = torch.tensor(weights, dtype=torch.float64)
    return {
        name: (torch.stack([u[name].double() for u in updates]) * w.view(-1, *[1] * len(shape))).sum(0) / w.sum()
        for name, shape in SHAPES.items()
    }


def _stream(updates: list[dict[str, torch.Tensor]], weights: list[float]) -> StreamingMean:
    mean = StreamingMean()
    for update, weight in zip(updates, weights, strict=True):
        mean.add(update, weight)
    return mean


@pytest.mark.parametrize("count", [1, 2, 7])
def test_streaming_mean_equals_reference_weighted_mean(count: int) -> None:
    updates, weights = _updates(count, seed=count)
    mean = _stream(updates, weights)
    result = mean.mean()
    reference = _reference(updates, weights)
    assert mean.count == count
    assert mean.total_weight == pytest.approx(sum(weights))
    for name in SHAPES:
        assert result[name].dtype == torch.float32 and result[name].shape == SHAPES[name]
        torch.testing.assert_close(result[name], reference[name].float(), rtol=1e-6, atol=1e-7)


def test_uniform_weights_give_the_plain_mean() -> None:
    updates, _ = _updates(4)
    result = _stream(updates, [1.0] * 4).mean()
    for name in SHAPES:
        expected = torch.stack([u[name] for u in updates]).double().mean(0).float()
        torch.testing.assert_close(result[name], expected, rtol=1e-6, atol=1e-7)


def test_single_update_mean_is_that_update() -> None:
    updates, _ = _updates(1)
    result = _stream(updates, [17.0]).mean()
    for name in SHAPES:
        assert torch.equal(result[name], updates[0][name])


def test_result_is_independent_of_arrival_order() -> None:
    updates, weights = _updates(5, seed=3)
    baseline = _stream(updates, weights).mean()
    for order in itertools.islice(itertools.permutations(range(5)), 1, None, 7):
        result = _stream([updates[i] for i in order], [weights[i] for i in order]).mean()
        for name in SHAPES:
            assert (result[name] - baseline[name]).abs().max().item() <= 1e-7, order


def test_inputs_are_not_modified() -> None:
    updates, weights = _updates(3)
    copies = [{k: v.clone() for k, v in u.items()} for u in updates]
    mean = _stream(updates, weights)
    mean.mean()
    mean.add(updates[0], 2.0)
    for update, copy in zip(updates, copies, strict=True):
        for name in SHAPES:
            assert torch.equal(update[name], copy[name])


def test_half_precision_updates_are_summed_in_float64() -> None:
    update = {"w": torch.tensor([0.1], dtype=torch.float16)}
    mean = StreamingMean()
    for _ in range(1000):
        mean.add(update, 1.0)
    assert mean.mean()["w"].item() == pytest.approx(float(torch.tensor(0.1, dtype=torch.float16)), rel=1e-7)


@pytest.mark.parametrize("weight", [0.0, -1.0])
def test_non_positive_weight_is_rejected(weight: float) -> None:
    mean = StreamingMean()
    with pytest.raises(ValueError, match="weight must be positive"):
        mean.add({"w": torch.zeros(2)}, weight)
    assert mean.count == 0 and mean.total_weight == 0.0


def test_update_with_different_names_is_rejected() -> None:
    mean = StreamingMean()
    mean.add({"a": torch.zeros(2), "b": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="names differ"):
        mean.add({"a": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="names differ"):
        mean.add({"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2)}, 1.0)
    assert mean.count == 1


def test_empty_mean_is_an_error() -> None:
    with pytest.raises(ValueError, match="no updates merged"):
        StreamingMean().mean()


@pytest.mark.parametrize("server_lr", [1.0, 0.5, 2.0])
def test_apply_update_is_server_sgd(server_lr: float) -> None:
    g = torch.Generator().manual_seed(11)
    state = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    delta = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    new = apply_update(state, delta, server_lr)
    assert set(new) == set(state)
    for name in SHAPES:
        assert new[name].dtype == torch.float32
        expected = (state[name].double() + server_lr * delta[name].double()).float()
        assert torch.equal(new[name], expected)
    # The inputs stay as they were.
    assert not any(new[name] is state[name] for name in SHAPES)


def test_apply_update_with_unit_lr_and_zero_delta_is_identity() -> None:
    state = {"w": torch.randn(3, 3)}
    assert torch.equal(apply_update(state, {"w": torch.zeros(3, 3)}, 1.0)["w"], state["w"])


def test_apply_update_keeps_tensors_without_a_delta() -> None:
    """Personal tensors are not in the averaged delta: the global state keeps them as they were."""
    state = {"w": torch.zeros(1), "personal": torch.full((1,), 3.0)}
    assert apply_update(state, {"w": torch.ones(1)}, 0.5) == {"w": torch.full((1,), 0.5), "personal": state["personal"]}
