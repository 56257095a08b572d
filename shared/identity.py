"""Client identities: each bound client signs its updates with its own Ed25519 key.

An operator enrolls a client (`pwff client enroll site-a`): a key pair is made, the private key goes
to the client's worker (`--key`), and the public key is registered in the clients file that the
aggregator reads (`PWFF_CLIENTS_FILE`):

    clients:
      site-a: {public_key: "<base64 of the 32-byte Ed25519 public key>"}
    revoked: [site-b]

A worker signs every update it uploads for a bound client (`UpdateSigner`); the aggregator verifies
the signature against the key enrolled for the client the update claims to be (`ClientRegistry`),
so a worker holding client A's key cannot publish an update for client B. The signed bytes bind the
client's identity, every field of the announcement and the SHA-256 of the uploaded blob, so neither
the message nor the stored update can be swapped. The registry re-reads the file whenever it
changes: removing a client's key or listing it under `revoked` stops its updates at once.

How this composes with a per-job HMAC on bus messages (a deployment secret): the HMAC says that a
message comes from a party of this deployment and job; the signature says which client made an
update. They check different things and nest: the signature is a field inside the message, the HMAC
covers the whole encoded message, signature included. Verify the HMAC first (cheap, drops rogue
publishers), then the signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_DOMAIN = b"pwff-client-v1"
"""Prefixed to every signed payload, so a signature made for something else never verifies as a client's."""

SignedKind = Literal["update", "evaluation"]
"""What a client signs: its updates (verified by the aggregator) and its evaluations (by the scheduler)."""


class IdentityError(ValueError):
    """A signature that does not verify, a client that is not enrolled or is revoked, a bad key or file."""


def payload_digest(blob: bytes) -> str:
    """The SHA-256 (hex) of an uploaded blob, which an update's signature covers."""
    return hashlib.sha256(blob).hexdigest()


def signed_bytes(identity: str, fields: Mapping[str, Any], kind: SignedKind = "update") -> bytes:
    """The bytes a client signs: the domain, what it is (an update's signature never verifies as an
    evaluation's), its identity and the message's fields.

    `fields` is the message's JSON form without its signature; sorted keys and fixed separators make
    the encoding the same in the worker and in the aggregator.
    """
    body = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    return b"\n".join((_DOMAIN, kind.encode(), identity.encode(), body))


# -- keys ---------------------------------------------------------------------------------


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as the clients file holds it: base64 of its 32 raw bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as error:
        raise IdentityError(f"cannot read the key {path}: {error.strerror}") from None
    except (ValueError, TypeError) as error:
        raise IdentityError(f"{path} is not an unencrypted PEM private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write the key readable by its owner only (0600), created so: never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_key_pem(key))


def _public_key(text: str, identity: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as error:
        raise IdentityError(
            f"client {identity!r}: public_key is not base64 of a 32-byte Ed25519 key ({error})"
        ) from None


# -- signing and verifying ----------------------------------------------------------------


@dataclass(frozen=True)
class UpdateSigner:
    """One client's signing key, held by its worker."""

    identity: str
    key: Ed25519PrivateKey

    @classmethod
    def from_file(cls, identity: str, path: Path) -> UpdateSigner:
        return cls(identity, load_private_key(path))

    def sign(self, fields: Mapping[str, Any], kind: SignedKind = "update") -> str:
        """Base64 signature of `fields` (a message's JSON form without its signature) as this client."""
        return base64.b64encode(self.key.sign(signed_bytes(self.identity, fields, kind))).decode()


@dataclass(frozen=True)
class _Enrolled:
    keys: dict[str, Ed25519PublicKey]
    revoked: frozenset[str]


def read_clients_file(path: Path) -> dict[str, Any]:
    """The clients file as data ({} when it does not exist yet)."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise IdentityError(f"cannot read the clients file {path}: {error}") from None
    if not isinstance(data, dict):
        raise IdentityError(f"the clients file {path} must be a mapping with 'clients' (and 'revoked')")
    return data


def write_clients_file(path: Path, data: Mapping[str, Any]) -> None:
    """Replace the file in one rename, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(yaml.safe_dump(dict(data), sort_keys=True), encoding="utf-8")
    os.replace(partial, path)


def _parse(data: Mapping[str, Any], path: Path) -> _Enrolled:
    clients = data.get("clients") or {}
    revoked = data.get("revoked") or []
    if not isinstance(clients, dict) or not isinstance(revoked, list):
        raise IdentityError(f"{path}: 'clients' must map identities to {{public_key}}, 'revoked' must be a list")
    keys: dict[str, Ed25519PublicKey] = {}
    for identity, entry in clients.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("public_key"), str):
            raise IdentityError(f"{path}: client {identity!r} needs a public_key")
        keys[str(identity)] = _public_key(entry["public_key"], str(identity))
    return _Enrolled(keys, frozenset(str(i) for i in revoked))


class ClientRegistry:
    """The enrolled clients' public keys, read from the clients file and re-read whenever it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._enrolled = _Enrolled({}, frozenset())

    def _current(self) -> _Enrolled:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            # One stat per verification: a revocation written to the file counts from the next update on.
            if stamp != self._stamp:
                self._enrolled = (
                    _parse(read_clients_file(self.path), self.path) if stamp else _Enrolled({}, frozenset())
                )
                self._stamp = stamp
            return self._enrolled

    def verify(self, identity: str, fields: Mapping[str, Any], signature: str, kind: SignedKind = "update") -> None:
        """Raise IdentityError unless `signature` is `identity`'s, by its enrolled and unrevoked key."""
        enrolled = self._current()
        if identity in enrolled.revoked:
            raise IdentityError(f"client {identity!r} is revoked")
        key = enrolled.keys.get(identity)
        if key is None:
            raise IdentityError(f"client {identity!r} is not enrolled in {self.path}")
        if not signature:
            raise IdentityError(f"{kind} of client {identity!r} is not signed")
        try:
            key.verify(base64.b64decode(signature, validate=True), signed_bytes(identity, fields, kind))
        except (InvalidSignature, binascii.Error, ValueError):
            raise IdentityError(f"{kind} signature does not verify as client {identity!r}") from None


def broker_permissions(namespace: str, identity: str) -> tuple[str, str, str]:
    """The RabbitMQ permissions (configure, write, read regexes) of a bound client's own broker user.

    `rabbitmqctl set_permissions -p VHOST USER CONFIGURE WRITE READ`: it may declare only its own task
    queue and that queue's dead-letter queue, consume only its own task queue, and publish only
    through the default exchange (its updates to the aggregate queue, its evaluations to the events
    queue, which the platform's services declared: its worker runs with `declare_published=False`).
    It can neither read another client's tasks nor the platform's queues, nor delete or purge them.
    """
    from shared.bus import Queues

    # Identities and namespaces hold letters, digits, '-', '_' and '.': only the dots need escaping.
    own = Queues(namespace).client_tasks(identity).replace(".", "\\.")
    return f"^{own}(\\.dead)?$", "^amq\\.default$", f"^{own}$"


def enroll(identity: str, key_path: Path, clients_file: Path | None = None) -> str:
    """Make `identity`'s key pair: the private key to `key_path` (0600); the public key, returned, is
    registered in `clients_file` when given (and the identity taken off its revoked list)."""
    key = new_key()
    write_private_key(key_path, key)
    public = public_key_text(key)
    if clients_file is not None:
        data = read_clients_file(clients_file)
        clients = dict(data.get("clients") or {})
        clients[identity] = {"public_key": public}
        revoked = [i for i in data.get("revoked") or [] if i != identity]
        write_clients_file(clients_file, {**data, "clients": clients, "revoked": revoked})
    return public


def revoke(identity: str, clients_file: Path) -> bool:
    """Remove `identity`'s key from `clients_file` and list it as revoked; False if it was not enrolled."""
    data = read_clients_file(clients_file)
    clients = dict(data.get("clients") or {})
    known = clients.pop(identity, None) is not None
    revoked = sorted({*(data.get("revoked") or []), identity})
    write_clients_file(clients_file, {**data, "clients": clients, "revoked": revoked})
    return known
