"""Full fine-tuning (`lora.full`): every base weight is trained; its update is a delta of the trainable
state, encoded, validated and averaged exactly like a LoRA's, through the same services."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForSequenceClassification

from services.embedded import EmbeddedCluster
from shared import data
from shared.adapters import build_model
from shared.catalog import dataset_info
from shared.codec import decode_tensors, encode_tensors
from shared.evaluation import evaluate, evaluation_subset
from shared.messages import UpdateReady
from shared.models import (
    extract_archive,
    initial_state,
    load_base_model,
    load_tokenizer,
    load_trainable_state,
    parameter_count,
    trainable_state,
)
from shared.modes.backprop import DeltaAccumulator, train_backprop
from shared.spec import JobSpec, SpecError, parse_spec
from shared.store import Keys

MAX_BYTES = 512 * 1024 * 1024


@pytest.fixture(scope="module")
def full_spec(tiny_spec: Callable[..., JobSpec]) -> JobSpec:
    return tiny_spec(lora={"full": True}, local_steps=3, optimizer={"lr": 0.01})


# -- the spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["none", "head"])
def test_full_finetuning_is_a_spec_field(tiny_spec: Callable[..., JobSpec], preset: str) -> None:
    spec = tiny_spec(lora={"full": True}, personalization={"preset": preset})
    assert spec.lora.full and not JobSpec().lora.full


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"personalization": {"preset": "pwff"}}, "preset 'pwff' has nothing to keep personal"),
        ({"personalization": {"preset": "fedsa"}}, "preset 'fedsa' has nothing to keep personal"),
        ({"mode": "fwd"}, "mode 'fwd' is not supported"),
        ({"model": "smollm2-135m", "dataset": "jane-austen"}, "513 MiB) exceed the 512 MiB bound"),
    ],
)
def test_full_finetuning_refuses_what_it_cannot_do(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=r"lora\.full") as raised:
        parse_spec({"model": "tiny-bert", "lora": {"full": True}, **overrides})
    assert message in str(raised.value)


# -- the model and its initial state ---------------------------------------------------------------


def test_every_weight_is_trainable_and_starts_as_the_base_weight(full_spec: JobSpec, cache_dir: Path) -> None:
    model = build_model(full_spec, cache_dir)
    assert all(p.requires_grad for p in model.parameters())
    base = load_base_model("tiny-bert", dataset_info(full_spec.dataset).num_labels, cache_dir)
    reference = dict(base.named_parameters())
    state = initial_state(model, 3)
    assert set(state) == set(reference)
    for name, value in state.items():
        if name.startswith("classifier."):
            continue
        assert torch.equal(value, reference[name].detach()), name
    # The head is new to every job: drawn from the seed, like a LoRA job's, not the base's random one.
    assert torch.equal(state["classifier.bias"], torch.zeros_like(state["classifier.bias"]))
    assert torch.equal(state["classifier.weight"], initial_state(model, 3)["classifier.weight"])
    assert not torch.equal(state["classifier.weight"], initial_state(model, 4)["classifier.weight"])
    # A cached model is overwritten by every task: the initial state must not read its parameters.
    load_trainable_state(model, {name: value + 1.0 for name, value in state.items()})
    again = initial_state(model, 3)
    assert all(torch.equal(again[name], state[name]) for name in state)


# -- an update: the delta of the trainable state, like a LoRA's --------------------------------------


def _announce(client: int, blob: bytes, samples: int) -> UpdateReady:
    return UpdateReady(
        job_id="job",
        round=1,
        client=client,
        attempt=0,
        wave=0,
        key=f"update-{client}",
        num_samples=samples,
        train_loss=1.0,
        compute_s=0.1,
        upload_bytes=len(blob),
        flops=1.0,
    )


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_an_update_round_trips_and_aggregates_like_a_lora_update(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path, full: bool
) -> None:
    spec = tiny_spec(lora={"r": 4, "alpha": 8, "full": full}, optimizer={"lr": 0.01})
    model = build_model(spec, cache_dir)
    tokenizer = load_tokenizer(spec.model, cache_dir)
    start = initial_state(model, 5)
    accumulator = DeltaAccumulator(spec, start)
    sent: list[tuple[dict[str, torch.Tensor], int]] = []
    for client in (0, 1):
        load_trainable_state(model, start)
        examples = data.client_examples(spec, client)
        train_backprop(model, tokenizer, examples, spec, "classification", 3, seed=client)
        after = trainable_state(model)
        delta = {name: after[name] - start[name] for name in start}
        blob = encode_tensors(delta, spec.compression.dtype, spec.compression.zstd_level)
        announce = _announce(client, blob, len(examples))
        decoded = accumulator.validate(announce, blob, MAX_BYTES)
        # The codec's float16 cast is the only loss on the way, whatever the update's size.
        assert set(decoded) == set(start)
        for name, value in decoded.items():
            assert torch.allclose(value, delta[name], atol=1e-3, rtol=1e-2), name
        accumulator.merge(announce, decoded)
        sent.append((decoded, len(examples)))
    committed = accumulator.commit(start, lambda name: None, 1).state
    total = sum(weight for _, weight in sent)
    for name, value in start.items():
        mean = sum(delta[name].double() * weight for delta, weight in sent) / total
        assert torch.allclose(committed[name].double(), value.double() + mean, atol=1e-6), name
    changed = [name for name in start if not torch.equal(committed[name], start[name])]
    if full:  # every layer of the body moved, not just a LoRA and a head
        assert any(".encoder.layer.0.attention.self.query.weight" in name for name in changed)
        assert any("word_embeddings" in name for name in changed)
    else:
        assert all("lora_" in name or "classifier" in name for name in changed)


def test_a_full_finetuning_step_is_priced_above_a_lora_step(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> None:
    """Weight gradients only for trainable parameters: full ~6NT, LoRA ~4NT on the same tokens."""
    flops, sizes = {}, {}
    for full in (False, True):
        spec = tiny_spec(lora={"r": 4, "alpha": 8, "full": full}, optimizer={"lr": 0.01})
        model = build_model(spec, cache_dir)
        load_trainable_state(model, initial_state(model, 5))
        examples = data.client_examples(spec, 0)
        tokenizer = load_tokenizer(spec.model, cache_dir)
        flops[full] = train_backprop(model, tokenizer, examples, spec, "classification", 2, seed=0).flops
        sizes[full] = (parameter_count(model), sum(p.numel() for p in model.parameters() if p.requires_grad))
    (n_full, trainable_full), (n_lora, trainable_lora) = sizes[True], sizes[False]
    assert trainable_full == n_full and trainable_lora < n_lora / 10
    tokens = flops[True] / (6 * n_full)  # the same batches (same seed and examples) for both
    assert tokens == int(tokens) > 0
    assert flops[False] == 2 * (2 * n_lora + trainable_lora) * tokens


# -- end to end through the services -----------------------------------------------------------------


def test_a_full_finetuning_job_trains_averages_and_publishes_full_weights(full_spec: JobSpec, cache_dir: Path) -> None:
    with EmbeddedCluster(cache_dir) as cluster:
        job_id = cluster.scheduler.submit(full_spec)
        job = cluster.wait(job_id, poll_s=0.05)
        archive = cluster.scheduler.model_archive(job_id)
        client_archive = cluster.scheduler.model_archive(job_id, 0)
        blob = cluster.store.get(Keys().global_state(job_id, full_spec.rounds))
    assert job["state"] == "succeeded", job.get("error")
    assert archive is not None and client_archive is not None and blob is not None
    state = decode_tensors(blob)
    base = dict(load_base_model("tiny-bert", dataset_info(full_spec.dataset).num_labels, cache_dir).named_parameters())
    moved = [n for n in state if n.startswith("bert.encoder.") and not torch.equal(state[n], base[n].detach())]
    assert len(moved) > 10  # the averaged updates moved the body's weights, not only a head
    last = job["metrics"][-1]
    assert last["bytes_up"] > 0 and last["bytes_down"] > 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = extract_archive(archive, Path(tmp))
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        published = safetensors.torch.load_file(str(folder / "model.safetensors"))
        assert all(torch.equal(published[name], value) for name, value in state.items())
        # An ordinary transformers folder: loads without pwff and scores what the aggregator reported.
        loaded = AutoModelForSequenceClassification.from_pretrained(str(folder))
    tokenizer = load_tokenizer(full_spec.model, cache_dir)
    examples = evaluation_subset(data.load(full_spec.dataset, "test"), full_spec.eval_max_examples)
    figures = evaluate(loaded, tokenizer, examples, "classification", full_spec.max_length)
    assert figures["accuracy"] == pytest.approx(last["accuracy"])
