"""`python -m services.worker`: a worker process against RabbitMQ and Redis (PWFF_* settings)."""

from __future__ import annotations

import os
import socket

from services.worker.worker import Worker
from shared.bus.rabbitmq import RabbitBus
from shared.health import Readiness, serve_probes
from shared.metrics import dead_letter_counter
from shared.runtime import run_until_signalled
from shared.settings import Settings, configure_process
from shared.signing import BusAuth
from shared.store.redis import RedisStore


def main() -> None:
    settings = Settings(metrics_port=int(os.environ.get("PWFF_METRICS_PORT", "9101")))
    configure_process(settings)
    auth = BusAuth.for_service(settings.bus_secret)
    worker = Worker(
        RabbitBus(settings.rabbitmq_url, on_dead_letter=dead_letter_counter(settings.namespace)),
        RedisStore(settings.redis_url),
        namespace=settings.namespace,
        cache_dir=settings.cache_dir,
        update_ttl_s=settings.update_ttl_s,
        max_message_bytes=settings.max_message_bytes,
        auth=auth,
        name=f"worker@{socket.gethostname()}:{os.getpid()}",
        tasks_queue=settings.tasks_queue,
    )
    # /healthz, /readyz (consume loop, broker and store, from the connections it already has) and /metrics.
    probes = serve_probes(
        settings.metrics_port,
        Readiness(worker.bus, worker.tasks_queue, worker.state.store, stale_after_s=settings.probe_stale_s),
    )
    try:
        run_until_signalled(worker.run)
    finally:
        if probes is not None:
            probes.close()


if __name__ == "__main__":
    main()
