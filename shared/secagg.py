"""Secure aggregation: pairwise masking with dropout recovery (Bonawitz et al., CCS 2017).

The server learns the sum of the surviving clients' vectors and nothing else about any one of
them (honest-but-curious server, clients that follow the protocol). Everything is over integers
modulo 2^bits: a client's (clipped, weighted) update is fixed-point encoded, then masked with

    y_i = x_i + PRG(b_i) + sum_{j in U1, j > i} PRG(s_ij) - sum_{j in U1, j < i} PRG(s_ij)   (mod 2^bits)

where s_ij = HKDF(X25519(mask_sk_i, mask_pk_j)) bound to the job and round, so the pairwise terms
cancel in the sum over U1, and b_i is a fresh self-mask seed. Each client Shamir-shares b_i and its
mask private key t-of-|U1| among the clients of U1, each share encrypted to its recipient
(X25519 + HKDF + ChaCha20-Poly1305, the associated data binding job, round, sender and recipient).
After masking, the surviving clients U3 reveal, for every sender in U2 (masked vector arrived) its
b-share, and for every sender in U1 \\ U2 (dropped) its mask-key share; never both for one sender.
With t shares the server rebuilds each survivor's b_i and each dropped client's mask key, and
removes every mask that does not cancel. A round with fewer than t survivors cannot be unmasked.

The phases (all stateless on the server side: every input is a message):

1. `ClientKeys.generate()` / `advertise`: two X25519 key pairs per client per round (enc, mask).
2. `mask_vector` + `share_secrets`: the masked vector and the encrypted shares.
3. `reveal`: a survivor's decrypted shares for the server.
4. `unmask`: the server's reconstruction and the sum of U2's plain vectors.

Fixed-point helpers (`encode_fixed` / `decode_fixed`) map float vectors to Z_{2^bits}: composing
with quantization means masking the quantized values' fixed-point integers.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1
"""The Shamir field: a Mersenne prime above every 32-byte secret (b_i seeds and X25519 private keys)."""

SECRET_BYTES = 32
_RAW = serialization.Encoding.Raw
_RAW_PUBLIC = serialization.PublicFormat.Raw
_RAW_PRIVATE = serialization.PrivateFormat.Raw


class SecAggError(ValueError):
    """A protocol message that is malformed or inconsistent, or a round that cannot be unmasked."""


# -- keys ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientKeys:
    """A client's two key pairs for one round: `enc` encrypts shares to it, `mask` derives pairwise masks.

    Separate pairs, as in the paper: revealing a dropped client's mask key (to remove its masks)
    must not let the server read the shares that were encrypted to it.
    """

    enc: bytes
    mask: bytes
    """Raw 32-byte X25519 private keys."""

    @classmethod
    def generate(cls) -> ClientKeys:
        return cls(_private_bytes(X25519PrivateKey.generate()), _private_bytes(X25519PrivateKey.generate()))

    def public(self) -> PublicKeys:
        return PublicKeys(_public_of(self.enc), _public_of(self.mask))

    def to_bytes(self) -> bytes:
        return self.enc + self.mask

    @classmethod
    def from_bytes(cls, raw: bytes) -> ClientKeys:
        if len(raw) != 2 * SECRET_BYTES:
            raise SecAggError(f"client keys: expected {2 * SECRET_BYTES} bytes, got {len(raw)}")
        return cls(raw[:SECRET_BYTES], raw[SECRET_BYTES:])


@dataclass(frozen=True)
class PublicKeys:
    enc: bytes
    mask: bytes


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, _RAW_PRIVATE, serialization.NoEncryption())


def _public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, _RAW_PUBLIC)


def _agree(private: bytes, public: bytes, purpose: str, context: bytes) -> bytes:
    """A 32-byte key shared by the two parties, bound to its purpose and to the job and round."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as error:  # wrong length, or a low-order point (all-zero shared secret)
        raise SecAggError(f"key agreement failed: {error}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode() + b"|" + context).derive(shared)


def round_context(job_id: str, round_: int) -> bytes:
    """What every derived key is bound to: a key from another job or round never unmasks this one."""
    return f"pwff-secagg|{job_id}|{round_}".encode()


# -- masks ---------------------------------------------------------------------------------------


def container(bits: int) -> np.dtype[np.unsignedinteger]:
    """The smallest unsigned integer type that holds values mod 2^bits."""
    if not 2 <= bits <= 64:
        raise SecAggError(f"bits must be in [2, 64], got {bits}")
    return np.dtype(np.uint16 if bits <= 16 else np.uint32 if bits <= 32 else np.uint64)


def _modulus_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` pseudo-random integers mod 2^bits (uint64): the ChaCha20 keystream of `seed`."""
    key = hashlib.sha256(b"pwff-secagg-prg|" + seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64) & _modulus_mask(bits)


def pairwise_seed(own_mask: bytes, peer_mask_public: bytes, context: bytes) -> bytes:
    return _agree(own_mask, peer_mask_public, "mask", context)


def mask_vector(
    values: np.ndarray,
    bits: int,
    me: int,
    keys: ClientKeys,
    peers: Mapping[int, PublicKeys],
    self_seed: bytes,
    context: bytes,
) -> np.ndarray:
    """`values` (integers mod 2^bits) plus this client's self mask and its pairwise masks with `peers`.

    Returns the masked vector in the `container(bits)` type, ready to upload.
    """
    modulus = _modulus_mask(bits)
    total = values.astype(np.uint64) & modulus
    total += prg(self_seed, total.size, bits)
    for peer, public in peers.items():
        if peer == me:
            continue
        pad = prg(pairwise_seed(keys.mask, public.mask, context), total.size, bits)
        # uint64 arithmetic wraps mod 2^64, a multiple of 2^bits: the low bits are exact.
        if peer > me:
            total += pad
        else:
            total -= pad
    return (total & modulus).astype(container(bits))


# -- Shamir secret sharing over GF(PRIME) ----------------------------------------------------------


def shamir_split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of `secret` for each holder (x = holder + 1); any `threshold` of them rebuild it."""
    if not 1 <= threshold <= len(holders):
        raise SecAggError(f"threshold {threshold} must be in [1, {len(holders)}]")
    value = int.from_bytes(secret, "big")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for holder in holders:
        x, y = holder + 1, 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares[holder] = y
    return shares


def shamir_combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (holder -> share), by Lagrange interpolation at 0."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (holder_i, y_i) in enumerate(points):
        x_i, numerator, denominator = holder_i + 1, 1, 1
        for j, (holder_j, _) in enumerate(points):
            if i != j:
                x_j = holder_j + 1
                numerator = numerator * (-x_j) % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise SecAggError("the shares do not rebuild a secret (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")


# -- encrypted shares ----------------------------------------------------------------------------


def _share_aad(context: bytes, sender: int, recipient: int) -> bytes:
    return context + f"|share|{sender}->{recipient}".encode()


def share_secrets(
    me: int, keys: ClientKeys, self_seed: bytes, peers: Mapping[int, PublicKeys], threshold: int, context: bytes
) -> dict[int, bytes]:
    """This client's b-share and mask-key share for every client of U1 (itself included), each
    encrypted so only its recipient can read it: recipient -> ciphertext."""
    holders = sorted(peers)
    if me not in peers:
        raise SecAggError(f"client {me} is not among the round's advertised clients")
    b_shares = shamir_split(self_seed, holders, threshold)
    key_shares = shamir_split(keys.mask, holders, threshold)
    sealed = {}
    for holder in holders:
        plain = msgpack.packb([share_bytes(b_shares[holder]), share_bytes(key_shares[holder])])
        key = _agree(keys.enc, peers[holder].enc, "share", context)
        nonce = os.urandom(12)
        sealed[holder] = nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, _share_aad(context, me, holder))
    return sealed


@dataclass(frozen=True)
class Share:
    b: int
    mask_key: int


def open_share(
    me: int, keys: ClientKeys, sender: int, sender_public: PublicKeys, sealed: bytes, context: bytes
) -> Share:
    """Decrypt the share `sender` encrypted to this client (authenticated: a tampered share is refused)."""
    key = _agree(keys.enc, sender_public.enc, "share", context)
    if len(sealed) < 12 + 16:
        raise SecAggError(f"share from client {sender} is too short")
    try:
        plain = ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], _share_aad(context, sender, me))
    except InvalidTag:
        raise SecAggError(f"share from client {sender} fails authentication") from None
    b, mask_key = msgpack.unpackb(plain)
    return Share(int.from_bytes(b, "big"), int.from_bytes(mask_key, "big"))


def share_bytes(value: int) -> bytes:
    """A Shamir share as fixed-length big-endian bytes (msgpack integers stop at 64 bits)."""
    return value.to_bytes(math.ceil(PRIME.bit_length() / 8), "big")


def reveal(
    me: int,
    keys: ClientKeys,
    sealed_to_me: Mapping[int, bytes],
    advertised: Mapping[int, PublicKeys],
    survivors: Iterable[int],
    context: bytes,
) -> dict[str, dict[int, int]]:
    """What a surviving client hands the server: b-shares of survivors (U2), mask-key shares of the
    dropped (U1 minus U2); never both for one sender, so no client's vector can be unmasked alone."""
    alive = set(survivors)
    revealed: dict[str, dict[int, int]] = {"b": {}, "mask_key": {}}
    for sender, sealed in sealed_to_me.items():
        if sender not in advertised:
            continue
        share = open_share(me, keys, sender, advertised[sender], sealed, context)
        if sender in alive:
            revealed["b"][sender] = share.b
        else:
            revealed["mask_key"][sender] = share.mask_key
    return revealed


# -- the server's side ---------------------------------------------------------------------------


def unmask(
    masked_sum: np.ndarray,
    bits: int,
    advertised: Mapping[int, PublicKeys],
    survivors: Iterable[int],
    reveals: Mapping[int, Mapping[str, Mapping[int, int]]],
    threshold: int,
    context: bytes,
) -> np.ndarray:
    """The sum of the survivors' plain vectors (uint64, mod 2^bits) from the sum of their masked ones.

    Parameters
    ----------
    masked_sum : array
        Sum mod 2^bits of the masked vectors of `survivors` (U2).
    advertised : mapping
        U1: every client whose keys the maskers used, with its public keys.
    reveals : mapping
        Revealing client -> its `reveal` output.
    """
    alive = set(survivors)
    if not alive <= set(advertised):
        raise SecAggError("survivors must be among the advertised clients")
    dropped = sorted(set(advertised) - alive)
    modulus = _modulus_mask(bits)
    total = masked_sum.astype(np.uint64) & modulus
    for client in sorted(alive):
        shares = {holder: r["b"][client] for holder, r in reveals.items() if client in r.get("b", {})}
        if len(shares) < threshold:
            raise SecAggError(f"self mask of client {client}: {len(shares)} shares revealed, {threshold} needed")
        total -= prg(shamir_combine(shares, threshold), total.size, bits)
    for gone in dropped:
        shares = {holder: r["mask_key"][gone] for holder, r in reveals.items() if gone in r.get("mask_key", {})}
        if len(shares) < threshold:
            raise SecAggError(f"mask key of dropped client {gone}: {len(shares)} shares revealed, {threshold} needed")
        mask_key = shamir_combine(shares, threshold)
        if _public_of(mask_key) != advertised[gone].mask:
            raise SecAggError(f"the rebuilt mask key of client {gone} does not match its advertised key")
        for client in alive:
            pad = prg(pairwise_seed(mask_key, advertised[client].mask, context), total.size, bits)
            # Survivor `client` added +pad for a higher-numbered peer and -pad for a lower one.
            if gone > client:
                total -= pad
            else:
                total += pad
    return total & modulus


# -- fixed point ---------------------------------------------------------------------------------


def fixed_point_scale(bits: int, clip: float, total_weight: float) -> float:
    """The largest power-of-two scale at which a weighted sum of vectors clipped to [-clip, clip], with
    weights adding up to at most `total_weight`, cannot overflow a signed integer of `bits` bits."""
    bound = clip * max(total_weight, 1.0) + 1.0  # + 1: one unit of rounding per client at most, loosely
    exponent = math.floor(math.log2((2 ** (bits - 1) - 1) / bound))
    if exponent < 0:
        raise SecAggError(
            f"{bits} bits cannot hold a sum of weight {total_weight:g} at clip {clip:g}; raise bits or lower clip"
        )
    return float(2**exponent)


def encode_fixed(values: np.ndarray, scale: float, clip: float, weight: float, bits: int) -> np.ndarray:
    """round(clip(values) * weight * scale) as integers mod 2^bits (two's complement), uint64."""
    clipped = np.clip(values.astype(np.float64), -clip, clip) * weight * scale
    signed = np.rint(clipped).astype(np.int64)
    return signed.view(np.uint64) & _modulus_mask(bits)


def decode_fixed(values: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """Integers mod 2^bits (two's complement) back to floats (float64)."""
    unsigned = values.astype(np.uint64) & _modulus_mask(bits)
    signed = unsigned.astype(np.int64)
    if bits < 64:
        signed = np.where(unsigned >= np.uint64(1 << (bits - 1)), signed - (1 << bits), signed)
    return signed.astype(np.float64) / scale
