from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ServiceCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[ServiceCluster]:
    logs = tmp_path_factory.mktemp("service-logs")
    services = ServiceCluster(logs, model_cache)
    try:
        yield services
    finally:
        services.close()
        for log in sorted(logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {log.name} (last lines)\n" + "\n".join(tail))


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The real model cache (converted SmolLM2 lives there), shared by every process of the run."""
    from shared.settings import Settings

    return Settings().cache_dir
