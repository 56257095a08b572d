"""Update codecs (shared/codec.py): quantization, top-k, error feedback, malformed updates, downloads.

Everything decoded here came from the network: every malformation is a CodecError, never a crash
or a silently wrong tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import safetensors.torch
import torch
import zstandard

from services.aggregator.aggregator import Aggregator
from services.embedded import EmbeddedCluster
from services.scheduler.core import Scheduler, sample_clients
from services.worker.worker import Worker, _Cached
from shared import data
from shared.adapters import build_peft_model
from shared.batches import collate
from shared.bus import Queues
from shared.bus.memory import MemoryBus
from shared.catalog import Task
from shared.codec import (
    RESIDUAL_PREFIX,
    UPDATE_MAGIC,
    Codec,
    CodecError,
    apply_delta,
    decode_tensors,
    decode_update,
    encode_tensors,
    encode_update,
    kept_count,
    split_residual,
    state_digest,
)
from shared.messages import InitJob, InvalidMessage, TrainTask, UpdateMerged, decode_aggregator, decode_task, encode
from shared.metrics import DOWNLOAD_BYTES
from shared.models import initial_state, load_tokenizer, load_trainable_state
from shared.modes.backprop import SHARDS, BackpropMode, TokenizedShard
from shared.modes.base import LocalContext
from shared.spec import JobSpec, SpecError, parse_spec
from shared.state import Repositories
from shared.state.tensors import DOWNLOAD_DELTA, DOWNLOAD_RESIDUAL
from shared.store import Keys
from shared.store.memory import MemoryStore
from tests.conftest import TINY
from tests.test_aggregator import World, drain, received

State = dict[str, torch.Tensor]

CODECS = {
    "float32": Codec("float32"),
    "float16": Codec("float16"),
    "bfloat16": Codec("bfloat16"),
    "int8": Codec(quantize="int8"),
    "int4": Codec(quantize="int4"),
    "int8-nearest": Codec(quantize="int8", rounding="nearest"),
    "int4-block256": Codec(quantize="int4", block_size=256),
    "top0.1+float16": Codec(topk=0.1),
    "top0.25+int8": Codec(topk=0.25, quantize="int8"),
    "top0.05+int4": Codec(topk=0.05, quantize="int4", block_size=32),
}


def _tensors(seed: int = 0) -> State:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.lora_A.weight": torch.randn(8, 96, generator=g) * 3e-3,
        "layer.lora_B.weight": torch.randn(96, 8, generator=g) * 1e-4,
        "classifier.weight": torch.randn(5, 96, generator=g) * 2e-2,
        "classifier.bias": torch.randn(5, generator=g) * 1e-2,
        "odd": torch.randn(3, 37, generator=g),  # not a multiple of any block size, odd 4-bit count
        "zeros": torch.zeros(70),
        "scalar": torch.tensor(0.5),
    }


def _block_bounds(values: torch.Tensor, block: int, levels: int) -> torch.Tensor:
    """Per value: its block's step (absmax / levels, as the bfloat16 scale is rounded up by at most 2^-7)."""
    flat = values.reshape(-1)
    blocks = -(-flat.numel() // block)
    padded = torch.nn.functional.pad(flat.abs(), (0, blocks * block - flat.numel())).view(blocks, block)
    step = padded.amax(dim=1) / levels * (1 + 2**-7)
    return step.repeat_interleave(block)[: flat.numel()]


# -- round trips within each codec's bound -----------------------------------------------------------


@pytest.mark.parametrize("name", list(CODECS))
def test_each_codec_round_trips_within_its_bound(name: str) -> None:
    codec = CODECS[name]
    original = _tensors()
    encoded = encode_update(original, codec, seed=11)
    update = decode_update(encoded.blob, expected=original)
    assert update.codec == Codec(
        dtype=codec.dtype,
        quantize=codec.quantize,
        block_size=codec.block_size,
        rounding=codec.rounding,
        topk=codec.topk,
    )
    assert update.codec.name == codec.name
    assert set(update.tensors) == set(original)
    for tensor_name, value in original.items():
        decoded = update.tensors[tensor_name]
        # What the encoder says the receiver gets is exactly what it gets (error feedback relies on it).
        assert torch.equal(decoded, encoded.decoded[tensor_name]), tensor_name
        assert decoded.dtype == torch.float32 and decoded.shape == value.shape
        flat, got = value.reshape(-1), decoded.reshape(-1)
        if codec.topk is not None:
            kept = flat.abs().topk(kept_count(flat.numel(), codec.topk)).indices.sort().values
            dropped = torch.ones(flat.numel(), dtype=torch.bool).index_fill(0, kept, False)
            assert not bool(got[dropped].any()), tensor_name  # what top-k drops decodes to zero
            flat, got = flat[kept], got[kept]  # the kept entries, in index order, are coded as a dense vector
        if codec.quantize == "none":
            assert torch.equal(got, flat.to(getattr(torch, codec.dtype)).float()), tensor_name
        else:
            levels = 127 if codec.quantize == "int8" else 7
            bound = _block_bounds(flat, codec.block_size, levels)
            if codec.rounding == "nearest":
                bound = bound / 2
            assert bool(((got - flat).abs() <= bound + 1e-12).all()), tensor_name


def test_quantized_uploads_are_smaller() -> None:
    original = {"w": torch.randn(64, 1024) * 1e-3}
    size = {name: len(encode_update(original, CODECS[name], seed=0).blob) for name in CODECS}
    assert size["float16"] < size["float32"] / 1.8
    assert size["int8"] < size["float32"] / 3.5
    assert size["int4"] < size["float32"] / 6.5
    assert size["top0.1+float16"] < size["float32"] / 12


def test_encoding_is_deterministic_for_a_seed() -> None:
    original = _tensors()
    reordered = dict(reversed(list(original.items())))
    for codec in CODECS.values():
        assert encode_update(original, codec, seed=5).blob == encode_update(reordered, codec, seed=5).blob
    quantized = CODECS["int4"]
    assert encode_update(original, quantized, seed=5).blob != encode_update(original, quantized, seed=6).blob
    with pytest.raises(ValueError, match="seed"):
        encode_update(original, quantized)


def test_stochastic_rounding_is_unbiased() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, generator=g)
    x[:64] = 0.3 * x[:64].abs().max()  # values nearest rounding always moves the same way
    draws = 1500
    for quantize, levels in (("int8", 127), ("int4", 7)):
        codec = Codec(quantize=quantize, block_size=64)
        total = torch.zeros_like(x, dtype=torch.float64)
        for seed in range(draws):
            total += encode_update({"x": x}, codec, seed=seed).decoded["x"].double()
        mean = total / draws
        step = _block_bounds(x, 64, levels).double()
        # One draw is off by at most one step (std <= step / 2); the mean of n draws by step / (2 sqrt(n)).
        tolerance = 5 * step / (2 * math.sqrt(draws))
        assert bool(((mean - x.double()).abs() <= tolerance).all()), quantize
        nearest = Codec(quantize=quantize, block_size=64, rounding="nearest")
        biased = encode_update({"x": x}, nearest).decoded["x"].double()
        assert float((biased - x.double()).abs().max()) > float(tolerance.max())  # the test can tell


@pytest.mark.parametrize("numel", [1, 7, 100, 1000, 4097])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_top_k_keeps_exactly_k(numel: int, fraction: float) -> None:
    g = torch.Generator().manual_seed(numel)
    cases = {"random": torch.randn(numel, generator=g), "ties": torch.full((numel,), 0.25)}
    for label, tensor in cases.items():
        k = kept_count(numel, fraction)
        assert k == min(numel, max(1, math.ceil(fraction * numel)))
        encoded = encode_update({"t": tensor}, Codec("float32", topk=fraction))
        kept = encoded.decoded["t"] != 0
        assert int(kept.sum()) == k, label
        if label == "random":
            assert torch.equal(
                kept, torch.zeros(numel, dtype=torch.bool).index_fill(0, tensor.abs().topk(k).indices, True)
            )
        assert torch.equal(encoded.decoded["t"][kept], tensor[kept])


def test_dense_payloads_still_decode_as_updates() -> None:
    original = _tensors()
    blob = encode_tensors(original, "float32")
    update = decode_update(blob, expected=original)
    assert update.codec is None and all(torch.equal(update.tensors[n], t) for n, t in original.items())
    # ...and every pwff payload decodes through decode_tensors.
    compressed = encode_update(original, CODECS["int8"], seed=1)
    assert all(torch.equal(decode_tensors(compressed.blob)[n], compressed.decoded[n]) for n in original)


# -- error feedback -----------------------------------------------------------------------------------


def _context(spec: JobSpec, model: torch.nn.Module, start: State, personal: State, round_: int) -> LocalContext:
    tokenizer = load_tokenizer(spec.model, Path("."))
    return LocalContext(
        spec=spec,
        task=TrainTask(job_id="ef-job", round=round_, client=1, local_steps=spec.local_steps),
        model=model,
        tokenizer=tokenizer,
        examples=data.client_examples(spec, 1),
        start_state=start,
        personal=personal,
        artifact=lambda name, r: None,
    )


@pytest.mark.parametrize(
    "compression",
    [{"topk": 0.05, "quantize": "int4"}, {"topk": 0.2}, {"quantize": "int4", "block_size": 256}],
    ids=["top0.05+int4", "top0.2", "int4"],
)
def test_error_feedback_sends_everything_eventually(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path, compression: dict[str, object]
) -> None:
    """Over several rounds, what was sent plus the final residual is the sum of the true updates."""
    spec = tiny_spec(compression={**compression, "error_feedback": True}, local_steps=2)
    model = build_peft_model(spec, cache_dir)
    mode = BackpropMode()
    state = initial_state(model, 1)
    personal: State = {}
    true_sum = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in state.items()}
    sent_sum = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in state.items()}
    residual: State = {}
    for round_ in range(1, 6):
        load_trainable_state(model, state)
        result = mode.run_local(_context(spec, model, state, personal, round_))
        after = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        sent = decode_update(result.payload, expected=state).tensors
        model_part, residual = split_residual(result.personal)
        assert not model_part  # nothing is personal in this job: only the residual is client-side
        assert set(residual) == set(state)
        for name in state:
            true_sum[name] += (after[name] - state[name]).double()
            sent_sum[name] += sent[name].double()
        # The server applies what it received; the client keeps what it did not send.
        state = apply_delta(state, sent)
        personal = result.personal
    for name in state:
        torch.testing.assert_close(sent_sum[name] + residual[name].double(), true_sum[name], rtol=0, atol=1e-6)
    assert any(float(r.abs().max()) > 0 for r in residual.values())  # something was held back


def test_without_error_feedback_nothing_is_kept(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> None:
    spec = tiny_spec(compression={"topk": 0.1})
    model = build_peft_model(spec, cache_dir)
    state = initial_state(model, 1)
    load_trainable_state(model, state)
    result = BackpropMode().run_local(_context(spec, model, state, {}, 1))
    assert not any(name.startswith(RESIDUAL_PREFIX) for name in result.personal)


# -- malformed updates --------------------------------------------------------------------------------


def _forge(header: dict[str, object], parts: State) -> bytes:
    packed = msgpack.packb(header)
    body = len(packed).to_bytes(4, "little") + packed + safetensors.torch.save(parts)
    return UPDATE_MAGIC + zstandard.ZstdCompressor().compress(body)


def _pieces(codec: Codec, tensors: State | None = None) -> tuple[dict[str, object], State]:
    """The header and parts of a valid update, to corrupt one piece at a time."""
    # Seeded: whether "mask disagrees" changes the marked count must not depend on the global RNG.
    default = {"w": torch.randn(10, 13, generator=torch.Generator().manual_seed(0))}
    blob = encode_update(tensors or default, codec, seed=0).blob
    raw = zstandard.ZstdDecompressor().decompress(blob[4:])
    length = int.from_bytes(raw[:4], "little")
    return msgpack.unpackb(raw[4 : 4 + length]), safetensors.torch.load(raw[4 + length :])


def _with(mapping: dict[str, object], path: str, value: object) -> dict[str, object]:
    out = msgpack.unpackb(msgpack.packb(mapping))
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return out


INT8, INT4, TOPK = Codec(quantize="int8"), Codec(quantize="int4", block_size=16), Codec(topk=0.3, quantize="int8")


def _malformed() -> dict[str, tuple[bytes, str]]:
    h8, p8 = _pieces(INT8)
    h4, p4 = _pieces(INT4)
    ht, pt = _pieces(TOPK)
    hd, pd = _pieces(Codec())
    nan_scale = {**p8, "w/s": p8["w/s"].clone().fill_(float("nan"))}
    negative_scale = {**p8, "w/s": -p8["w/s"]}
    low = {**p8, "w/q": p8["w/q"].clone().index_fill_(0, torch.tensor([3]), -128)}
    bad_nibble = {**p4, "w/q": p4["w/q"].clone().index_fill_(0, torch.tensor([0]), 0x00)}
    mask = pt["w/mask"].clone()
    mask[0] ^= 0xFF
    good = _forge(h8, p8)
    return {
        "bad magic": (b"PWX1" + good[4:], "magic"),
        "not zstd": (UPDATE_MAGIC + b"definitely not zstd" * 3, "zstd"),
        "truncated blob": (good[: len(good) // 2], "zstd"),
        "truncated header": (UPDATE_MAGIC + zstandard.ZstdCompressor().compress(b"\x10\x00"), "truncated"),
        "header longer than payload": (
            UPDATE_MAGIC + zstandard.ZstdCompressor().compress((999).to_bytes(4, "little") + b"\x80"),
            "header length",
        ),
        "header not msgpack": (
            UPDATE_MAGIC + zstandard.ZstdCompressor().compress((3).to_bytes(4, "little") + b"\xc1\xc1\xc1"),
            "msgpack",
        ),
        "header version": (_forge(_with(h8, "v", 2), p8), "version"),
        "unknown quantizer": (_forge(_with(h8, "codec.quantize", "int3"), p8), "quantizer"),
        "block size zero": (_forge(_with(h8, "codec.block", 0), p8), "block size"),
        "block size is text": (_forge(_with(h8, "codec.block", "64"), p8), "codec.block"),
        "wrong block count": (_forge(_with(h8, "codec.block", 16), p8), "w/s"),
        "wrong block count (4-bit)": (_forge(h4, {**p4, "w/s": p4["w/s"][:-1]}), "w/s"),
        "wrong shape": (_forge(_with(h8, "tensors.w.shape", [13, 10, 1]), p8), "shape"),
        "huge claimed shape": (_forge(_with(h8, "tensors.w.shape", [1 << 20, 1 << 20]), p8), "claims"),
        "kept count lies": (_forge(_with(ht, "tensors.w.kept", 5), pt), "kept"),
        "mask disagrees": (_forge(ht, {**pt, "w/mask": mask}), "marked"),
        "missing part": (_forge(h8, {"w/q": p8["w/q"]}), "missing"),
        "extra part": (_forge(h8, {**p8, "evil": torch.zeros(1)}), "unexpected"),
        "part dtype": (_forge(h8, {**p8, "w/q": p8["w/q"].to(torch.int16)}), "dtype"),
        "NaN scale": (_forge(h8, nan_scale), "scale"),
        "negative scale": (_forge(h8, negative_scale), "scale"),
        "8-bit value out of range": (_forge(h8, low), "out of range"),
        "4-bit value out of range": (_forge(h4, bad_nibble), "out of range"),
        "truncated payload": (_forge(h8, {**p8, "w/q": p8["w/q"][:-7]}), "w/q"),
        "NaN dense value": (_forge(hd, {"w/v": pd["w/v"].clone().fill_(float("nan"))}), "NaN"),
    }


MALFORMED = _malformed()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_update_is_rejected(case: str) -> None:
    blob, message = MALFORMED[case]
    with pytest.raises(CodecError, match=message):
        decode_update(blob, expected={"w": torch.zeros(10, 13)})


def test_update_for_other_tensors_is_rejected_before_decoding() -> None:
    blob = encode_update({"w": torch.randn(10, 13)}, INT8, seed=0).blob
    with pytest.raises(CodecError, match="names differ"):
        decode_update(blob, expected={"v": torch.zeros(10, 13)})
    with pytest.raises(CodecError, match="shape"):
        decode_update(blob, expected={"w": torch.zeros(13, 10)})


def test_decoded_size_is_bounded() -> None:
    blob = encode_update({"w": torch.zeros(512, 512)}, INT4, seed=0).blob  # 1 MiB as float32, tiny on the wire
    assert len(blob) < 8 * 1024
    with pytest.raises(CodecError):
        decode_update(blob, max_bytes=512 * 1024)
    assert decode_update(blob, max_bytes=2 * 1024 * 1024).tensors["w"].shape == (512, 512)


def test_nan_or_overflow_is_refused_at_encoding() -> None:
    with pytest.raises(CodecError, match="NaN"):
        encode_update({"w": torch.tensor([1.0, float("inf")])}, INT8, seed=0)
    with pytest.raises(CodecError, match="overflows float16"):
        encode_update({"w": torch.tensor([1e9])}, Codec("float16"), seed=0)
    assert encode_update({"w": torch.tensor([1e30])}, INT8, seed=0).decoded["w"].item() == pytest.approx(1e30, rel=1e-2)


# -- the aggregator: a malformed compressed update is rejected, counted, and the round still commits ----


@pytest.fixture
def make_world(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> Callable[..., World]:
    def make(**overrides: object) -> World:
        bus, store = MemoryBus(), MemoryStore()
        spec = tiny_spec(**{"eval_max_examples": 8, **overrides})
        scheduler = Scheduler(bus, store)
        aggregator = Aggregator(bus, store, cache_dir=cache_dir)
        job_id = scheduler.submit(spec)
        [init] = drain(bus, Queues().aggregate)
        assert isinstance(decode_aggregator(init), InitJob)
        aggregator.handle(init)
        [event] = drain(bus, Queues().events)
        scheduler.handle_event(event)
        clients = [decode_task(body).client for body in drain(bus, Queues().tasks)]
        return World(bus, store, scheduler, aggregator, spec, job_id, clients, cache_dir)

    return make


@pytest.mark.parametrize("case", ["truncated blob", "wrong block count", "NaN scale", "header version"])
def test_malformed_compressed_update_is_rejected_and_the_round_commits_from_the_valid_ones(
    make_world: Callable[..., World], case: str
) -> None:
    world = make_world(compression={"quantize": "int8", "download": "float32"})
    bad, *good = world.clients
    codec = Codec.for_uploads(world.spec.compression)
    start = world.global_state(0)
    sent: dict[int, State] = {}
    before = received("invalid")
    for client in world.clients:
        delta = world.delta(client)
        encoded = encode_update(delta, codec, seed=client)
        blob = encoded.blob
        if client == bad:
            # The same corruption, applied to an update with this job's tensor names.
            header, parts = _pieces(INT8, delta)
            if case == "truncated blob":
                blob = blob[: len(blob) // 2]
            elif case == "wrong block count":
                blob = _forge(_with(header, "codec.block", 16), parts)
            elif case == "NaN scale":
                name = next(iter(delta))
                parts[f"{name}/s"] = parts[f"{name}/s"].clone().fill_(float("nan"))
                blob = _forge(header, parts)
            else:
                blob = _forge(_with(header, "v", 9), parts)
        body = world.announce(client, blob=blob)  # what the worker "uploaded"
        if client == bad:
            with pytest.raises(InvalidMessage, match="update"):
                world.aggregator.handle(body)
        else:
            world.aggregator.handle(body)
            sent[client] = encoded.decoded
    assert received("invalid") == before + 1
    assert world.merged() == set(good)
    assert [e.client for e in world.events() if isinstance(e, UpdateMerged)] == good
    committed = world.close()
    assert committed.clients == sorted(good)
    weights = {c: 10.0 + 7 * c for c in good}  # World.announce's num_samples
    total = sum(weights.values())
    state = world.global_state(1)
    for name, value in start.items():
        mean = sum(sent[c][name].double() * weights[c] for c in good) / total
        torch.testing.assert_close(state[name], (value.double() + mean).float(), rtol=0, atol=1e-7)


# -- downloads: the committed delta, and workers that apply it --------------------------------------------


@pytest.mark.parametrize("download", ["float32", "float16", "int8", "int4"])
def test_committed_state_is_previous_plus_the_download_delta(make_world: Callable[..., World], download: str) -> None:
    world = make_world(compression={"download": download})
    previous = world.global_state(0)
    for client in world.clients:
        world.aggregator.handle(world.announce(client))
    world.events()
    world.close()
    blob = world.store.get(world.keys.artifact(world.job_id, DOWNLOAD_DELTA, 1))
    assert blob is not None
    update = decode_update(blob, expected=previous)
    assert update.meta == {"round": 1, "base": state_digest(previous)}
    assert update.codec is not None and update.codec.name == download
    rebuilt = apply_delta(previous, update.tensors)
    committed = world.global_state(1)
    assert all(torch.equal(rebuilt[name], committed[name]) for name in committed)  # bit for bit


def test_lossy_downloads_carry_their_residual_into_the_next_round(make_world: Callable[..., World]) -> None:
    """Server-side error feedback: after two rounds of int4 downloads, committed state + residual is the
    exact state (what float32 downloads commit), so the quantization error never piles up."""
    exact_world, lossy_world = make_world(), make_world(compression={"download": "int4"})
    for round_ in (1, 2):
        for world in (exact_world, lossy_world):
            for client in sample_clients(world.spec, round_):
                delta = world.delta(client, scale=0.01 * round_)
                world.aggregator.handle(world.announce(client, delta=delta, round_=round_))
            world.events()
            world.scheduler.handle_event(encode(world.close(round_)))
            drain(world.bus, world.queues.tasks)
    exact, lossy = exact_world.global_state(2), lossy_world.global_state(2)
    blob = lossy_world.store.get(lossy_world.keys.artifact(lossy_world.job_id, DOWNLOAD_RESIDUAL, 2))
    residual = decode_tensors(blob or b"")
    assert any(float(r.abs().max()) > 1e-5 for r in residual.values())  # int4 did drop something
    for name in exact:
        torch.testing.assert_close(lossy[name] + residual[name], exact[name], rtol=0, atol=1e-6)


def test_worker_downloads_the_state_once_then_deltas(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> None:
    spec = tiny_spec(rounds=4, compression={"quantize": "int8", "download": "int8"})
    with EmbeddedCluster(cache_dir) as cluster:
        before = DOWNLOAD_BYTES._value.get()
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, poll_s=0.05)
        downloaded = DOWNLOAD_BYTES._value.get() - before
        store = cluster.store
    assert job["state"] == "succeeded", job.get("error")
    full = [len(store.get(Keys().global_state(job_id, r)) or b"") for r in (spec.rounds - 1, spec.rounds)]
    deltas = [m["download_delta_bytes"] for m in job["metrics"][1:]]
    # One worker: the initial state, then each round's delta once (not once per task, not the whole state);
    # the clients' final evaluation reads the last round's.
    assert downloaded == job["metrics"][1]["bytes_down"] / spec.clients_per_round + sum(deltas)
    assert max(deltas) < min(full) / 2


def test_worker_falls_back_to_the_whole_state(tiny_spec: Callable[..., JobSpec], cache_dir: Path) -> None:
    """A delta that is gone, corrupt or meant for another state is never applied."""
    spec = tiny_spec(rounds=3, compression={"download": "int8"})
    with EmbeddedCluster(cache_dir) as cluster:
        job_id = cluster.scheduler.submit(spec)
        assert cluster.wait(job_id, poll_s=0.05)["state"] == "succeeded"
        store = cluster.store
    keys = Keys()
    one, two = (decode_tensors(store.get(keys.global_state(job_id, r)) or b"") for r in (2, 3))
    delta_key = keys.artifact(job_id, DOWNLOAD_DELTA, 3)
    good_delta = store.get(delta_key) or b""
    for label, blob in {
        "gone": None,
        "corrupt": good_delta[:-20],
        "other base": encode_update(
            {n: torch.zeros_like(t) for n, t in one.items()}, Codec(quantize="int8"), 0, {"base": "0" * 32}
        ).blob,
    }.items():
        worker = Worker(MemoryBus(), store, cache_dir=cache_dir)
        worker._remember(job_id, _Cached(2, one))
        if blob is None:
            store.delete(delta_key)
        else:
            store.put(delta_key, blob)
        state = worker._global_state(job_id, 3)
        assert state is not None and all(torch.equal(state[n], two[n]) for n in two), label
    store.put(delta_key, good_delta)
    worker = Worker(MemoryBus(), store, cache_dir=cache_dir)
    worker._remember(job_id, _Cached(2, one))
    before = DOWNLOAD_BYTES._value.get()
    state = worker._global_state(job_id, 3)
    assert DOWNLOAD_BYTES._value.get() - before == len(good_delta)  # only the delta
    assert state is not None and all(torch.equal(state[n], two[n]) for n in two)


# -- end to end ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compression",
    [
        {"quantize": "int4", "error_feedback": True, "download": "int4"},
        {"topk": 0.1, "quantize": "int8", "error_feedback": True, "download": "int8"},
    ],
    ids=["int4+ef", "top0.1+int8+ef"],
)
def test_a_compressed_job_with_error_feedback_and_a_personal_head_succeeds(
    tiny_spec: Callable[..., JobSpec], cache_dir: Path, compression: dict[str, object]
) -> None:
    spec = tiny_spec(rounds=3, compression=compression, personalization={"preset": "head"})
    with EmbeddedCluster(cache_dir, workers=2) as cluster:
        job_id = cluster.scheduler.submit(spec)
        job = cluster.wait(job_id, poll_s=0.05)
        store = cluster.store
    assert job["state"] == "succeeded", job.get("error")
    final = decode_tensors(store.get(Keys().global_state(job_id, 3)) or b"")
    shared = {name: value for name, value in final.items() if "classifier" not in name}
    dense = len(encode_update(shared, Codec("float16")).blob)  # today's upload of the same tensors
    assert all(0 < m["bytes_up"] / m["updates"] < dense / 1.5 for m in job["metrics"][1:])
    repo = Repositories(store).tensors
    for client in range(spec.num_clients):
        personal = repo.latest_personal(job_id, client, before=(spec.rounds + 1, 0))
        residual = repo.latest_residual(job_id, client, before=(spec.rounds + 1, 0))
        assert (personal is None) == (residual is None)
        if personal is not None and residual is not None:
            assert all("classifier" in name for name in decode_tensors(personal[1]))
            assert all("lora_" in name for name in decode_tensors(residual[1]))  # the head is personal


# -- the spec and the tokenized shards --------------------------------------------------------------------


def test_compression_spec_fields() -> None:
    spec = parse_spec({**TINY, "compression": {"quantize": "int4", "topk": 0.05, "error_feedback": True}})
    assert Codec.for_uploads(spec.compression).name == "top0.05+int4"
    assert Codec.for_downloads(spec.compression).name == "float32"
    assert Codec.for_downloads(parse_spec({**TINY, "compression": {"download": "int8"}}).compression).name == "int8"
    for bad in ({"topk": 0}, {"topk": 1.5}, {"quantize": "int2"}, {"block_size": 4}, {"download": "int2"}):
        with pytest.raises(SpecError, match="compression"):
            parse_spec({**TINY, "compression": bad})


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_tokenized_shard_batches_equal_collate(model: str, cache_dir: Path) -> None:
    dataset = "bbc-news" if model == "tiny-bert" else "jane-austen"
    spec = parse_spec({**TINY, "model": model, "dataset": dataset, "partition": {"kind": "iid"}})
    tokenizer = load_tokenizer(model, cache_dir)
    examples = data.client_examples(spec, 0)
    task: Task = "classification" if model == "tiny-bert" else "causal-lm"
    shard = TokenizedShard(tokenizer, examples, spec.max_length)
    for indices in ([0, 1, 2, 3], [5, 0, 9], [3]):
        cached = shard.batch(indices, task)
        reference = collate(tokenizer, [examples[i] for i in indices], task, spec.max_length)
        assert set(cached) == set(reference)
        assert all(torch.equal(cached[k], reference[k]) for k in reference), indices
    same = SHARDS.get(("job", 0), tokenizer, examples, spec.max_length)
    assert SHARDS.get(("job", 0), tokenizer, examples, spec.max_length) is same
    assert SHARDS.get(("job", 1), tokenizer, examples, spec.max_length) is not same
