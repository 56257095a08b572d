"""Seeds derived from a job's seed, so every process draws the same numbers for the same purpose."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts; stable across processes and Python versions."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
