"""Process settings from the environment (PWFF_*), shared by every service."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pwff"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PWFF_", extra="ignore")

    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = Field("pwff", pattern=r"^[A-Za-z0-9_.-]+$", description="prefix of queues and keys")
    api_token: str = ""
    api_host: str = "0.0.0.0"
    api_port: int = 8080
    metrics_port: int = 0
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    torch_threads: int = 0
    malloc_mmap_threshold: int = Field(
        1024 * 1024,
        ge=0,
        le=32 * 1024 * 1024,
        description="glibc serves blocks at least this large with mmap and unmaps them when freed (0: glibc default)",
    )
    log_level: str = "INFO"
    update_ttl_s: int = Field(7 * 24 * 3600, description="how long an uploaded update may wait in the store")
    max_message_bytes: int = 64 * 1024
    max_update_bytes: int = 512 * 1024 * 1024


def configure_process(settings: Settings) -> None:
    """Settings every service applies once at start: logging, offline hub, allocator, torch threads."""
    import logging

    from shared.allocator import set_mmap_threshold

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("pika", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    set_mmap_threshold(settings.malloc_mmap_threshold)
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
