"""`python -m services.scheduler`: the API and round loop against RabbitMQ and Redis."""

from __future__ import annotations

import logging
import sys
import threading

import uvicorn

from services.scheduler.api import create_app
from services.scheduler.core import Scheduler
from services.scheduler.tenants import SubmitRateLimiter, Tenants
from shared.bus.rabbitmq import RabbitBus
from shared.identity import ClientRegistry, TaskSigner
from shared.metrics import dead_letter_counter
from shared.settings import Settings, configure_process
from shared.signing import BusAuth
from shared.store.redis import RedisStore

log = logging.getLogger("services.scheduler")


def main() -> None:
    settings = Settings()
    configure_process(settings)
    try:
        tenants = (
            Tenants.from_file(settings.tenants_file) if settings.tenants_file else Tenants.single(settings.api_token)
        )
    except ValueError as error:
        sys.exit(f"{error}: the scheduler refuses to serve an unauthenticated API")
    auth = BusAuth.for_service(settings.bus_secret)
    scheduler = Scheduler(
        RabbitBus(settings.rabbitmq_url, on_dead_letter=dead_letter_counter(settings.namespace)),
        RedisStore(settings.redis_url),
        namespace=settings.namespace,
        retention_s=settings.job_retention_s,
        job_pools=settings.job_pools,
        auth=auth,
        identities=ClientRegistry(settings.clients_file) if settings.clients_file is not None else None,
        task_signer=TaskSigner.from_file(settings.scheduler_key) if settings.scheduler_key is not None else None,
    )
    stop = threading.Event()
    loop = threading.Thread(target=scheduler.run, args=(stop,), name="scheduler-loop", daemon=True)
    loop.start()
    try:
        # uvicorn handles SIGTERM/SIGINT itself and returns; then the loop stops too.
        uvicorn.run(
            create_app(
                scheduler,
                tenants,
                probe_stale_s=settings.probe_stale_s,
                submit_limit=SubmitRateLimiter(settings.submit_rate_per_minute, settings.submit_burst),
            ),
            host=settings.api_host,
            port=settings.api_port,
            log_level=settings.log_level.lower(),
            access_log=False,
        )
    finally:
        stop.set()
        loop.join(timeout=10)


if __name__ == "__main__":
    main()
