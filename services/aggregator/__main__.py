"""`python -m services.aggregator`: the aggregator process against RabbitMQ and Redis."""

from __future__ import annotations

import os

from services.aggregator.aggregator import Aggregator
from shared.bus import Queues
from shared.bus.rabbitmq import RabbitBus
from shared.health import Readiness, serve_probes
from shared.identity import ClientRegistry
from shared.metrics import dead_letter_counter
from shared.runtime import run_until_signalled
from shared.settings import Settings, configure_process
from shared.signing import BusAuth
from shared.store.redis import RedisStore


def main() -> None:
    settings = Settings(metrics_port=int(os.environ.get("PWFF_METRICS_PORT", "9102")))
    configure_process(settings)
    auth = BusAuth.for_service(settings.bus_secret)
    aggregator = Aggregator(
        RabbitBus(settings.rabbitmq_url, on_dead_letter=dead_letter_counter(settings.namespace)),
        RedisStore(settings.redis_url),
        namespace=settings.namespace,
        cache_dir=settings.cache_dir,
        max_message_bytes=settings.max_message_bytes,
        auth=auth,
        max_update_bytes=settings.max_update_bytes,
        identities=ClientRegistry(settings.clients_file) if settings.clients_file is not None else None,
    )
    # /healthz, /readyz (consume loop, broker and store, from the connections it already has) and /metrics.
    probes = serve_probes(
        settings.metrics_port,
        Readiness(
            aggregator.bus,
            Queues(settings.namespace).aggregate,
            aggregator.state.store,
            stale_after_s=settings.probe_stale_s,
        ),
        settings.probes_host,
    )
    try:
        run_until_signalled(aggregator.run)
    finally:
        if probes is not None:
            probes.close()


if __name__ == "__main__":
    main()
