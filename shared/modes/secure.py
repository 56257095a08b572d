"""Backprop rounds under secure aggregation (`shared.secagg`), on pwff's waves of stateless tasks.

A secure round is four waves of the same round, the rounds of Bonawitz et al.'s protocol, dispatched
through the scheduler's wave mechanism (`MoreWork`), each to every client the round sampled:

- wave 0, advertise: the client draws two X25519 key pairs for the round, keeps the private keys
  among its own secrets (stored under the client's key; the aggregator never reads them) and
  uploads the public keys and its FedAvg weight;
- wave 1, share: a client of U1 (the merged advertisements, which the server broadcasts) draws its
  self-mask seed and uploads it and its mask key, Shamir-shared t-of-|U1| among U1, each share
  encrypted to its recipient;
- wave 2, mask: a client of U2 (the clients whose shares arrived) trains, encodes its delta with
  the job's codec, clips, weights and fixed-point encodes it mod 2^bits, and uploads it masked
  with its self mask and its pairwise masks with U2;
- wave 3, unmask: a client of U3 (the merged masked uploads) decrypts the shares sent to it and
  reveals b-shares of U3 and mask-key shares of U2 minus U3 (clients that shared, then dropped).

The aggregator keeps only the running sum of masked vectors (O(model)), the public keys and the
revealed shares; at commit it removes the masks (`shared.secagg.unmask`), divides by the
survivors' total weight and applies the mean as FedAvg does. Each wave's set is fixed once the
next wave is asked for (`closes_waves`: later uploads of an earlier wave are late), and every
upload names the set it was built on, so a mismatch fails the round instead of a wrong sum.
A client outside the set of the wave before uploads an empty "abstain" so the wave need not wait
for its deadline. Training happens in wave 2 with the seeds an unmasked run's wave 0 uses, so the
committed state equals the unmasked run's to fixed-point precision.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import torch

from shared import secagg
from shared.aggregation import apply_update
from shared.catalog import model_info
from shared.codec import split_residual
from shared.modes.backprop import SHARDS, encode_delta, train_backprop
from shared.modes.base import LocalContext, LocalResult, MoreWork, RoundAccumulator, State, Step
from shared.personalization import is_personal
from shared.seeding import derive_seed

if TYPE_CHECKING:
    from shared.messages import UpdateReady
    from shared.spec import JobSpec

ADVERTISE, SHARE, MASK, UNMASK = 0, 1, 2, 3
"""The waves of a secure round."""


def threshold_of(spec: JobSpec, advertised: int) -> int:
    """t: shares needed to rebuild a secret, for a round whose U1 has `advertised` clients."""
    wanted = max(2, math.ceil(spec.secure_aggregation.threshold * advertised - 1e-9))
    return min(wanted, advertised)


def _secret_name(round_: int) -> str:
    return f"secagg-keys:{round_}"


def _seed_name(round_: int) -> str:
    return f"secagg-self-mask:{round_}"


def _weight(spec: JobSpec, examples: int) -> float:
    return float(examples) if spec.aggregation.weighting == "samples" else 1.0


def _pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _unpack(blob: bytes, max_bytes: int | None = None) -> dict[str, Any]:
    if max_bytes is not None and len(blob) > max_bytes:
        raise secagg.SecAggError(f"upload of {len(blob)} bytes exceeds {max_bytes}")
    try:
        message = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as error:
        raise secagg.SecAggError(f"not a secure-aggregation message: {error}") from None
    if not isinstance(message, dict) or not isinstance(message.get("phase"), str):
        raise secagg.SecAggError("not a secure-aggregation message")
    return message


def _advertisements(raw: Mapping[int, bytes]) -> dict[int, tuple[secagg.PublicKeys, float]]:
    """U1 with each client's public keys and weight, from the merged wave-0 uploads."""
    out = {}
    for client, blob in raw.items():
        message = _unpack(blob)
        out[client] = (secagg.PublicKeys(bytes(message["enc"]), bytes(message["mask"])), float(message["weight"]))
    return out


def _flatten(tensors: Mapping[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return np.concatenate([tensors[name].detach().reshape(-1).to(torch.float64).numpy() for name in names])


def _unflatten(vector: np.ndarray, like: Mapping[str, torch.Tensor], names: list[str]) -> State:
    out, offset = {}, 0
    for name in names:
        n = like[name].numel()
        out[name] = torch.from_numpy(vector[offset : offset + n].copy()).reshape(like[name].shape).to(torch.float32)
        offset += n
    return out


# -- the client's side ---------------------------------------------------------------------------


def run_secure_task(context: LocalContext) -> LocalResult:
    """One task of a secure round: its wave says which phase."""
    if context.round_uploads is None or context.secrets is None:
        raise RuntimeError("secure aggregation needs a worker that passes round uploads and client secrets")
    phases = {ADVERTISE: _advertise, SHARE: _share, MASK: _mask, UNMASK: _unmask}
    if context.task.wave not in phases:
        raise RuntimeError(f"a secure round has no wave {context.task.wave}")
    return phases[context.task.wave](context)


def _abstain() -> LocalResult:
    return LocalResult(payload=_pack({"phase": "abstain"}), loss=0.0, flops=0.0)


def _advertise(context: LocalContext) -> LocalResult:
    assert context.secrets is not None
    keys = secagg.ClientKeys.generate()
    context.secrets.put(_secret_name(context.task.round), keys.to_bytes())
    public = keys.public()
    weight = _weight(context.spec, len(context.examples))
    return LocalResult(
        payload=_pack({"phase": "advertise", "enc": public.enc, "mask": public.mask, "weight": weight}),
        loss=0.0,
        flops=0.0,
    )


def _own_keys(context: LocalContext) -> secagg.ClientKeys | None:
    assert context.secrets is not None
    raw = context.secrets.get(_secret_name(context.task.round))
    return secagg.ClientKeys.from_bytes(raw) if raw is not None else None


def _share(context: LocalContext) -> LocalResult:
    assert context.round_uploads is not None and context.secrets is not None
    task = context.task
    advertised = _advertisements(context.round_uploads(ADVERTISE))
    keys = _own_keys(context)
    if task.client not in advertised or keys is None or len(advertised) < 2:
        return _abstain()  # its advertisement missed the set every client shares among
    self_seed = secrets.token_bytes(secagg.SECRET_BYTES)
    context.secrets.put(_seed_name(task.round), self_seed)
    peers = {client: public for client, (public, _) in advertised.items()}
    shares = secagg.share_secrets(
        task.client,
        keys,
        self_seed,
        peers,
        threshold_of(context.spec, len(advertised)),
        secagg.round_context(task.job_id, task.round),
    )
    return LocalResult(
        payload=_pack({"phase": "shares", "u1": sorted(advertised), "shares": shares}), loss=0.0, flops=0.0
    )


def _shared(context: LocalContext, advertised: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
    """U2: the merged share uploads built on U1, with their encrypted shares."""
    assert context.round_uploads is not None
    out = {}
    for client, blob in context.round_uploads(SHARE).items():
        message = _unpack(blob)
        if message["phase"] == "shares" and message["u1"] == sorted(advertised):
            out[client] = message
    return out


def _mask(context: LocalContext) -> LocalResult:
    assert context.secrets is not None
    spec, task, settings = context.spec, context.task, context.spec.secure_aggregation
    assert context.round_uploads is not None
    advertised = _advertisements(context.round_uploads(ADVERTISE))
    # U2 without reading the share uploads: a client of U1 always uploads its shares, one outside
    # abstains (the aggregator checks every upload's claimed sets at commit).
    shared = sorted(set(context.round_uploads(SHARE)) & set(advertised))
    keys = _own_keys(context)
    self_seed = context.secrets.get(_seed_name(task.round))
    if task.client not in shared or keys is None or self_seed is None:
        return _abstain()  # its shares missed the set every masker uses
    # The same training and codec seeds as an unmasked run's (wave 0) task of this client.
    trained = train_backprop(
        context.model,
        context.tokenizer,
        context.examples,
        spec,
        model_info(spec.model).task,
        task.local_steps,
        derive_seed("train", spec.seed, task.round, task.client),
        shard=SHARDS.get((task.job_id, task.client), context.tokenizer, context.examples, spec.max_length),
    )
    _, residual = split_residual(context.personal)
    encoded, personal = encode_delta(context, residual, derive_seed("codec", spec.seed, task.round, task.client, 0))
    names = sorted(encoded.decoded)
    scale = secagg.fixed_point_scale(settings.bits, settings.clip, sum(advertised[c][1] for c in shared))
    weight = _weight(spec, len(context.examples))
    values = secagg.encode_fixed(_flatten(encoded.decoded, names), scale, settings.clip, weight, settings.bits)
    peers = {client: advertised[client][0] for client in shared}
    masked = secagg.mask_vector(
        values, settings.bits, task.client, keys, peers, self_seed, secagg.round_context(task.job_id, task.round)
    )
    payload = _pack({"phase": "masked", "u2": shared, "masked": masked.tobytes()})
    return LocalResult(payload=payload, loss=trained.loss, flops=trained.flops, personal=personal)


def _unmask(context: LocalContext) -> LocalResult:
    assert context.round_uploads is not None
    task = context.task
    advertised = _advertisements(context.round_uploads(ADVERTISE))
    shared = _shared(context, advertised)
    # U3 without reading the masked vectors: a client of U2 always uploads one, one outside abstains.
    survivors = sorted(set(context.round_uploads(MASK)) & set(shared))
    keys = _own_keys(context)
    if task.client not in survivors or keys is None:
        return _abstain()
    sealed_to_me = {sender: bytes(m["shares"][task.client]) for sender, m in shared.items()}
    peers = {client: advertised[client][0] for client in shared}
    revealed = secagg.reveal(
        task.client, keys, sealed_to_me, peers, survivors, secagg.round_context(task.job_id, task.round)
    )
    payload = _pack(
        {
            "phase": "reveal",
            "u3": survivors,
            "b": {c: secagg.share_bytes(v) for c, v in revealed["b"].items()},
            "mask_key": {c: secagg.share_bytes(v) for c, v in revealed["mask_key"].items()},
        }
    )
    return LocalResult(payload=payload, loss=0.0, flops=0.0)


# -- the aggregator's side -----------------------------------------------------------------------


@dataclass
class _Parsed:
    phase: str
    message: dict[str, Any]
    masked: np.ndarray | None = None


@dataclass
class _Round:
    advertised: dict[int, tuple[secagg.PublicKeys, float]] = field(default_factory=dict)
    """U1, with public keys and weights."""
    shared: set[int] = field(default_factory=set)
    """U2: clients whose encrypted shares arrived."""
    masked_sum: np.ndarray | None = None
    survivors: set[int] = field(default_factory=set)
    """U3: clients whose masked vector arrived."""
    claims: dict[str, set[tuple[int, ...]]] = field(default_factory=lambda: {"u1": set(), "u2": set(), "u3": set()})
    """The sets each later wave's uploads say they were built on."""
    reveals: dict[int, dict[str, dict[int, int]]] = field(default_factory=dict)
    waves: set[int] = field(default_factory=set)
    shares_bytes: int = 0


_PHASES = {
    ADVERTISE: ("advertise",),
    SHARE: ("shares", "abstain"),
    MASK: ("masked", "abstain"),
    UNMASK: ("reveal", "abstain"),
}


def _client_list(message: dict[str, Any], key: str) -> tuple[int, ...]:
    value = message.get(key)
    if not isinstance(value, list) or not all(isinstance(c, int) for c in value):
        raise secagg.SecAggError(f"{message['phase']} upload without its {key}")
    return tuple(value)


class SecureAccumulator(RoundAccumulator[_Parsed]):
    """A secure round's aggregate: public keys, the running sum of masked vectors, revealed shares.

    Order-free (a restarted aggregator re-merges the stored uploads sorted by client): every check
    that relates uploads of different waves waits for `commit`.
    """

    closes_waves = True

    def __init__(self, spec: JobSpec, start_state: State) -> None:
        super().__init__(spec, start_state)
        self.names = sorted(n for n in start_state if not is_personal(spec, n))
        self.size = sum(start_state[n].numel() for n in self.names)
        self.dtype = secagg.container(spec.secure_aggregation.bits)
        self.round = _Round()
        self.job_id = ""
        """Learnt from the uploads (the accumulator is built per round without it); keys are bound to it."""

    def _validate(self, announce: UpdateReady, blob: bytes, max_bytes: int) -> _Parsed:
        message = _unpack(blob, max_bytes)
        phase = message["phase"]
        if phase not in _PHASES.get(announce.wave, ()):
            raise secagg.SecAggError(f"a {phase!r} upload in wave {announce.wave} of a secure round")
        if phase == "advertise":
            for key in ("enc", "mask"):
                if not isinstance(message.get(key), bytes) or len(message[key]) != secagg.SECRET_BYTES:
                    raise secagg.SecAggError(f"advertisement: {key} must be a 32-byte X25519 public key")
            weight = message.get("weight")
            if not isinstance(weight, (int, float)) or not 0 < weight < 1e12:
                raise secagg.SecAggError(f"advertisement: bad weight {weight!r}")
        elif phase == "shares":
            _client_list(message, "u1")
            shares = message.get("shares")
            if not isinstance(shares, dict) or not all(
                isinstance(c, int) and isinstance(v, bytes) for c, v in shares.items()
            ):
                raise secagg.SecAggError("shares: must map recipients to encrypted shares")
        elif phase == "masked":
            _client_list(message, "u2")
            raw = message.get("masked")
            if not isinstance(raw, bytes) or len(raw) != self.size * self.dtype.itemsize:
                raise secagg.SecAggError(f"masked vector: expected {self.size} values of {self.dtype}")
            return _Parsed(phase, message, np.frombuffer(raw, dtype=self.dtype))
        elif phase == "reveal":
            _client_list(message, "u3")
            for kind in ("b", "mask_key"):
                shares = message.get(kind)
                if not isinstance(shares, dict) or not all(
                    isinstance(c, int) and isinstance(v, bytes) for c, v in shares.items()
                ):
                    raise secagg.SecAggError(f"reveal: {kind} must map clients to shares")
        return _Parsed(phase, message)

    def merge(self, announce: UpdateReady, update: _Parsed) -> None:
        state, message = self.round, update.message
        self.job_id = announce.job_id
        state.waves.add(announce.wave)
        if update.phase == "advertise":
            public = secagg.PublicKeys(message["enc"], message["mask"])
            state.advertised[announce.client] = (public, float(message["weight"]))
        elif update.phase == "shares":
            state.shared.add(announce.client)
            state.claims["u1"].add(_client_list(message, "u1"))
            state.shares_bytes += sum(len(v) for v in message["shares"].values())
        elif update.phase == "masked" and update.masked is not None:
            vector = update.masked.astype(np.uint64)
            # uint64 wraps mod 2^64, a multiple of 2^bits: the low bits of the sum are exact.
            state.masked_sum = vector if state.masked_sum is None else state.masked_sum + vector
            state.survivors.add(announce.client)
            state.claims["u2"].add(_client_list(message, "u2"))
        elif update.phase == "reveal":
            state.claims["u3"].add(_client_list(message, "u3"))
            state.reveals[announce.client] = {
                kind: {int(c): int.from_bytes(v, "big") for c, v in message[kind].items()} for kind in ("b", "mask_key")
            }

    def weight(self, announce: UpdateReady) -> float:
        # Only the training wave's uploads carry a training loss.
        if announce.wave == MASK and announce.client in self.round.survivors:
            return float(announce.num_samples) if self.spec.aggregation.weighting == "samples" else 1.0
        return 0.0

    def wants_more_work(self, force: bool) -> MoreWork | None:
        # Even at the deadline (force): the masked sum is useless until the survivors unmask it.
        rnd, waves = self.round, self.round.waves
        go = MoreWork(variance=0.0, perturbations=0)
        if UNMASK in waves:
            return None
        if MASK in waves:
            return go if rnd.survivors else None
        if SHARE in waves:
            return go if len(rnd.shared) >= threshold_of(self.spec, len(rnd.advertised)) else None
        return go if len(rnd.advertised) >= 2 else None

    def commit(self, state: State, previous: Callable[[str], State | None], round_: int) -> Step:
        rnd, settings = self.round, self.spec.secure_aggregation
        u1, u2, u3 = (tuple(sorted(s)) for s in (rnd.advertised, rnd.shared, rnd.survivors))
        threshold = threshold_of(self.spec, len(u1))
        figures = {
            "secagg_advertised": float(len(u1)),
            "secagg_shared": float(len(u2)),
            "secagg_survivors": float(len(u3)),
            "secagg_dropped": float(len(u2) - len(u3)),
            "secagg_revealed": float(len(rnd.reveals)),
            "secagg_threshold": float(threshold),
            "secagg_share_bytes": float(rnd.shares_bytes),
        }
        if rnd.masked_sum is None or not u3:
            if u1 and len(u2) < threshold:
                raise secagg.SecAggError(
                    f"round {round_}: {len(u2)} of {len(u1)} clients shared their secrets, {threshold} needed"
                )
            return Step(dict(state), figures=figures, clients=[])  # nothing was masked: the state stays
        for name, expected in (("u1", u1), ("u2", u2), ("u3", u3)):
            claimed = rnd.claims[name]
            if claimed and claimed != {expected}:
                raise secagg.SecAggError(
                    f"round {round_}: uploads were built on {name} = {sorted(claimed)}, the server has {expected}"
                )
        if len(rnd.reveals) < threshold:
            raise secagg.SecAggError(
                f"round {round_}: {len(rnd.reveals)} clients revealed shares, {threshold} needed to unmask"
            )
        context = secagg.round_context(self.job_id, round_)
        public = {client: rnd.advertised[client][0] for client in u2}
        plain = secagg.unmask(rnd.masked_sum, settings.bits, public, u3, rnd.reveals, threshold, context)
        scale = secagg.fixed_point_scale(settings.bits, settings.clip, sum(rnd.advertised[c][1] for c in u2))
        mean = secagg.decode_fixed(plain, scale, settings.bits) / sum(rnd.advertised[c][1] for c in u3)
        delta = _unflatten(mean, self.start_state, self.names)
        return Step(apply_update(state, delta, self.spec.aggregation.server_lr), figures=figures, clients=list(u3))
