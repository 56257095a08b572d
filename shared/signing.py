"""Authenticated bus messages: seals a sender adds and a receiver checks before it handles anything.

A message on the bus is its msgpack map (`shared.messages`) plus one string field per *seal*. Every
seal covers the same payload: the msgpack encoding of the map without any seal field, so seals are
independent of each other and can be stacked. `BusAuth` holds a service's seals: `seal` encodes a
message and adds each seal that applies to it; `verify` (called by the decoders in `shared.messages`)
checks each one and strips them. A message that lacks a seal that applies, or carries a wrong one, is
`Unauthenticated`, an `InvalidMessage`: the bus dead-letters it (never retried, never handled) and
`pwff_messages_rejected_total{reason}` counts it.

`JobMac` is the deployment's seal: HMAC-SHA256 with a key per job, derived with HKDF-SHA256 from the
deployment secret (PWFF_BUS_SECRET). Whoever can reach RabbitMQ but does not hold the secret cannot
forge a message for any job; a service that holds it derives every job's key, so one leaked job key
(e.g. handed to a job's own workers) does not open the others.

How it composes with client signatures (issue 13, `shared.identity`): a bound client's Ed25519
signature is a field of its `UpdateReady` / `ClientEvaluated` (`signature`, over every other field, the
blob's `digest` included), so the MAC covers it: the MAC says the message comes from this deployment
and job, the signature which client made it. Consumers check the MAC first (in the decoder), then the
signature (aggregator, scheduler). Another kind of tag that must travel outside the message's fields
is one more `Seal`: a map field reserved in `SEAL_FIELDS`, `applies` to the messages it covers, `tag`
made by the sender, `check` by the receiver; `BusAuth([JobMac(secret), TheNewSeal(...)])` stacks them.
A sender that cannot make a seal (e.g. a worker that holds only its own key) builds its `BusAuth` with
the seals it can produce.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import msgpack
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel

from shared.messages import InvalidMessage
from shared.metrics import MESSAGES_REJECTED

SEAL_FIELDS = frozenset({"mac"})
"""Map fields that carry seals (never message fields): "mac" is `JobMac`'s."""

_KDF_SALT = b"pwff-bus-v1"


class Unauthenticated(InvalidMessage):
    """A message whose seals do not check out; `reason` labels the rejection counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"unauthenticated message ({reason}): {detail}")
        self.reason = reason


class Seal(Protocol):
    """One kind of tag on a message: who adds it, what it proves."""

    field: str
    """The map field that carries it (one of SEAL_FIELDS)."""

    def applies(self, data: Mapping[str, Any]) -> bool:
        """Whether a message like `data` (its map, seals stripped) must carry this seal."""
        ...

    def tag(self, data: Mapping[str, Any], payload: bytes) -> str:
        """The seal of `payload` (the encoded `data`)."""
        ...

    def check(self, data: Mapping[str, Any], payload: bytes, tag: str) -> None:
        """Raise `Unauthenticated` unless `tag` is this seal of `payload`."""
        ...


class JobMac:
    """HMAC-SHA256 over the payload, keyed per job by HKDF-SHA256(deployment secret, info=job id)."""

    field = "mac"

    def __init__(self, secret: bytes, max_keys: int = 4096) -> None:
        if len(secret) < 16:
            raise ValueError("the bus secret must be at least 16 bytes (PWFF_BUS_SECRET)")
        self._secret = secret
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self._max_keys = max_keys

    def job_key(self, job_id: str) -> bytes:
        key = self._keys.get(job_id)
        if key is None:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_KDF_SALT, info=b"job:" + job_id.encode())
            key = hkdf.derive(self._secret)
            self._keys[job_id] = key
            while len(self._keys) > self._max_keys:  # derivation is cheap; the cache only saves it per message
                self._keys.popitem(last=False)
        return key

    def applies(self, data: Mapping[str, Any]) -> bool:
        return True  # every message names its job

    def tag(self, data: Mapping[str, Any], payload: bytes) -> str:
        job_id = data.get("job_id")
        if not isinstance(job_id, str):
            raise Unauthenticated("missing_tag", "a message without a job id cannot be keyed")
        return hmac.new(self.job_key(job_id), payload, hashlib.sha256).hexdigest()

    def check(self, data: Mapping[str, Any], payload: bytes, tag: str) -> None:
        # compare_digest over the hex digests: constant time whatever the attacker sent
        if not hmac.compare_digest(self.tag(data, payload).encode(), tag.encode()):
            raise Unauthenticated("bad_tag", f"the {self.field} of a {data.get('type')!r} message does not match")


def payload_of(data: Mapping[str, Any]) -> bytes:
    """What every seal covers: the message's map without seal fields, msgpack-encoded as `encode` does."""
    return msgpack.packb({k: v for k, v in data.items() if k not in SEAL_FIELDS}, use_bin_type=True)


class BusAuth:
    """A service's seals: adds them to what it publishes, checks them on what it consumes.

    With no seals (`BusAuth.unsealed()`) messages go out as plain maps and nothing is checked: only for
    one process talking to itself (unit tests); every service process runs with a `JobMac`.
    """

    def __init__(self, seals: Iterable[Seal]) -> None:
        self.seals = tuple(seals)
        for seal in self.seals:
            if seal.field not in SEAL_FIELDS:
                raise ValueError(f"seal field {seal.field!r} is not reserved in SEAL_FIELDS")

    @classmethod
    def from_secret(cls, secret: str) -> BusAuth:
        if not secret:
            raise ValueError("PWFF_BUS_SECRET is not set: bus messages cannot be authenticated")
        return cls([JobMac(secret.encode())])

    @classmethod
    def for_service(cls, secret: str) -> BusAuth:
        """A service process's seals from PWFF_BUS_SECRET; it refuses to start without one."""
        try:
            return cls.from_secret(secret)
        except ValueError as error:
            raise SystemExit(f"{error}: every service needs the same PWFF_BUS_SECRET") from None

    @classmethod
    def ephemeral(cls) -> BusAuth:
        """A random secret: every message is sealed and checked, within this process only (embedded mode)."""
        return cls([JobMac(secrets.token_bytes(32))])

    @classmethod
    def unsealed(cls) -> BusAuth:
        return cls([])

    def seal(self, message: BaseModel) -> bytes:
        data = message.model_dump(mode="json")
        payload = payload_of(data)
        if not self.seals:
            return payload
        for seal in self.seals:
            if seal.applies(data):
                data[seal.field] = seal.tag(data, payload)
        return msgpack.packb(data, use_bin_type=True)

    def verify(self, data: dict[str, Any]) -> dict[str, Any]:
        """The message's map without its seals, once every seal that applies checks out."""
        if not self.seals:
            return data
        tags = {field: data.pop(field) for field in SEAL_FIELDS if field in data}
        try:
            payload = payload_of(data)
            for seal in self.seals:
                if not seal.applies(data):
                    continue
                tag = tags.get(seal.field)
                if not isinstance(tag, str) or not tag:
                    raise Unauthenticated("missing_tag", f"a {data.get('type')!r} message without its {seal.field}")
                seal.check(data, payload, tag)
        except Unauthenticated as error:
            MESSAGES_REJECTED.labels(reason=error.reason).inc()
            raise
        return data


__all__ = ["SEAL_FIELDS", "BusAuth", "JobMac", "Seal", "Unauthenticated", "payload_of"]
