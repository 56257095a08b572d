"""`python -m services.worker`: a worker process against RabbitMQ and Redis (PWFF_* settings)."""

from __future__ import annotations

import os
import socket

from services.worker.worker import Worker
from shared.bus.rabbitmq import RabbitBus
from shared.metrics import dead_letter_counter, serve_metrics
from shared.runtime import run_until_signalled
from shared.settings import Settings, configure_process
from shared.store.redis import RedisStore


def main() -> None:
    settings = Settings(metrics_port=int(os.environ.get("PWFF_METRICS_PORT", "9101")))
    configure_process(settings)
    serve_metrics(settings.metrics_port)
    worker = Worker(
        RabbitBus(settings.rabbitmq_url, on_dead_letter=dead_letter_counter(settings.namespace)),
        RedisStore(settings.redis_url),
        namespace=settings.namespace,
        cache_dir=settings.cache_dir,
        update_ttl_s=settings.update_ttl_s,
        max_message_bytes=settings.max_message_bytes,
        name=f"worker@{socket.gethostname()}:{os.getpid()}",
    )
    run_until_signalled(worker.run)


if __name__ == "__main__":
    main()
