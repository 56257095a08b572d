"""Shared fixtures for the unit tests: offline hub, a temp cache dir, tiny job specs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.spec import JobSpec

TINY: dict[str, Any] = {
    "name": "tiny",
    "model": "tiny-bert",
    "dataset": "bbc-news",
    "num_clients": 4,
    "clients_per_round": 3,
    "rounds": 2,
    "local_steps": 2,
    "batch_size": 4,
    "max_length": 32,
    "eval_max_examples": 32,
    "lora": {"r": 4, "alpha": 8},
    "seed": 7,
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pwff-cache")


@pytest.fixture(scope="session")
def tiny_spec() -> Callable[..., JobSpec]:
    """`tiny_spec(**overrides)`: a tiny-bert job that trains and evaluates in milliseconds."""

    def make(**overrides: Any) -> JobSpec:
        return JobSpec.model_validate({**TINY, **overrides})

    return make
