"""Helpers for bound-client tests: each client's own JSONL file with marker strings, and its enrolled key."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import identity

CLIENTS = ("site-a", "site-b", "site-c")
LABELS = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True)
class Enrolled:
    id: str
    data: Path
    key: Path
    marker: str
    """A string in every example text of this client only: it must never be seen outside its worker."""


def write_client_data(path: Path, marker: str, per_label: int = 6) -> None:
    """`per_label` examples of each bbc-news class, every text carrying `marker` (labels by name and index)."""
    lines = []
    for index, label in enumerate(LABELS):
        for n in range(per_label):
            text = f"{marker} note {n} on {label} matters: figures and quotes number {n * 7 + index}"
            lines.append(json.dumps({"text": text, "label": label if n % 2 else index}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def enroll_clients(folder: Path, ids: tuple[str, ...] = CLIENTS) -> tuple[Path, list[Enrolled]]:
    """A clients file with every id enrolled, and each client's data file and private key."""
    clients_file = folder / "clients.yaml"
    enrolled = []
    for client in ids:
        marker = f"MARKER{uuid.uuid4().hex[:12]}"
        data = folder / f"{client}.jsonl"
        write_client_data(data, marker)
        key = folder / "keys" / f"{client}.key"
        identity.enroll(client, key, clients_file)
        enrolled.append(Enrolled(client, data, key, marker))
    return clients_file, enrolled


def bound_spec(ids: tuple[str, ...] = CLIENTS, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "bound",
        "model": "tiny-bert",
        "dataset": "bbc-news",
        "clients": {"kind": "bound", "ids": list(ids)},
        "rounds": 2,
        "local_steps": 2,
        "batch_size": 4,
        "max_length": 32,
        "eval_max_examples": 16,
        "lora": {"r": 4, "alpha": 8},
        "seed": 7,
        **overrides,
    }


def markers_in(blobs: list[bytes], markers: list[str]) -> list[str]:
    """The markers that occur in any of `blobs` (raw bytes, so text inside msgpack or JSON is found too)."""
    return [m for m in markers if any(m.encode() in blob for blob in blobs)]
