"""`python -m services.aggregator`: the aggregator process against RabbitMQ and Redis."""

from __future__ import annotations

import os

from services.aggregator.aggregator import Aggregator
from shared.bus.rabbitmq import RabbitBus
from shared.metrics import dead_letter_counter, serve_metrics
from shared.runtime import run_until_signalled
from shared.settings import Settings, configure_process
from shared.store.redis import RedisStore


def main() -> None:
    settings = Settings(metrics_port=int(os.environ.get("PWFF_METRICS_PORT", "9102")))
    configure_process(settings)
    serve_metrics(settings.metrics_port)
    aggregator = Aggregator(
        RabbitBus(settings.rabbitmq_url, on_dead_letter=dead_letter_counter(settings.namespace)),
        RedisStore(settings.redis_url),
        namespace=settings.namespace,
        cache_dir=settings.cache_dir,
        max_message_bytes=settings.max_message_bytes,
        max_update_bytes=settings.max_update_bytes,
    )
    run_until_signalled(aggregator.run)


if __name__ == "__main__":
    main()
