"""Who may call the API: tenants, their tokens (SHA-256 at rest), their role, and their submission rate.

The tenants file (PWFF_TENANTS_FILE, mounted from a Secret by the chart):

    tenants:
      team-a: {tokens_sha256: ["<sha256 hex of the token>"], role: member}
      ops:    {tokens_sha256: ["..."], role: admin}

A member sees and acts on its own jobs only; an admin on every job. Without a file, PWFF_API_TOKEN
alone is one admin tenant named `admin` (the quick start). A token is never stored: the file holds
its SHA-256, and a presented token's digest is compared with every known digest in constant time
(`hmac.compare_digest`, no early exit), so neither the file nor response times give a token away.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

TENANT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
DEFAULT_TENANT = "admin"
"""The tenant PWFF_API_TOKEN stands for when there is no tenants file."""


class Role(StrEnum):
    MEMBER = "member"
    ADMIN = "admin"


class _TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens_sha256: list[str] = Field(min_length=1, description="SHA-256 (hex) of each token of the tenant")
    role: Role = Role.MEMBER


class _TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, _TenantEntry] = Field(min_length=1)


@dataclass(frozen=True)
class Tenant:
    name: str
    role: Role

    @property
    def admin(self) -> bool:
        return self.role == Role.ADMIN


def hash_token(token: str) -> str:
    """What the tenants file holds for `token` (`printf %s TOKEN | sha256sum`)."""
    return hashlib.sha256(token.encode()).hexdigest()


class Tenants:
    def __init__(self, digests: dict[str, Tenant]) -> None:
        if not digests:
            raise ValueError("no tenant has a token: the API would let nobody in")
        self._entries = [(bytes.fromhex(digest), tenant) for digest, tenant in digests.items()]

    @classmethod
    def single(cls, token: str) -> Tenants:
        """PWFF_API_TOKEN alone: one admin tenant."""
        if not token:
            raise ValueError("the API needs a token: set PWFF_API_TOKEN or PWFF_TENANTS_FILE")
        return cls({hash_token(token): Tenant(DEFAULT_TENANT, Role.ADMIN)})

    @classmethod
    def from_file(cls, path: Path) -> Tenants:
        try:
            raw = yaml.safe_load(path.read_text())
            parsed = _TenantsFile.model_validate(raw)
        except (OSError, yaml.YAMLError, ValidationError) as error:
            raise ValueError(f"tenants file {path}: {error}") from None
        digests: dict[str, Tenant] = {}
        for name, entry in parsed.tenants.items():
            if not _matches(TENANT_NAME_PATTERN, name):
                raise ValueError(f"tenants file {path}: tenant name {name!r} must match {TENANT_NAME_PATTERN}")
            for digest in entry.tokens_sha256:
                digest = digest.strip().lower()
                if not _matches(r"^[0-9a-f]{64}$", digest):
                    raise ValueError(f"tenants file {path}: tenant {name}: {digest!r} is not a SHA-256 hex digest")
                if digest in digests and digests[digest].name != name:
                    raise ValueError(f"tenants file {path}: one token hash is listed for two tenants")
                digests[digest] = Tenant(name, entry.role)
        return cls(digests)

    def authenticate(self, token: str) -> Tenant | None:
        """The tenant whose token this is, or None; compares against every digest whatever matches."""
        presented = hashlib.sha256(token.encode()).digest()
        found: Tenant | None = None
        for digest, tenant in self._entries:
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found


def _matches(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


class SubmitRateLimiter:
    """A token bucket per tenant: `burst` submissions at once, refilled at `per_minute` a minute.

    In the API process's memory: each scheduler replica limits on its own (the chart runs one).
    """

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError("a submission rate limit needs per_minute > 0 and burst >= 1")
        self.rate_s = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, tenant: str) -> float:
        """0 when `tenant` may submit now (a token is spent), else the seconds until it may."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(tenant, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate_s)
            if tokens >= 1.0:
                self._buckets[tenant] = (tokens - 1.0, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1.0 - tokens) / self.rate_s


__all__ = ["DEFAULT_TENANT", "Role", "SubmitRateLimiter", "Tenant", "Tenants", "hash_token"]
