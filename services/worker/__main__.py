"""`python -m services.worker`: a worker process against RabbitMQ and Redis (PWFF_* settings).

Without arguments it is a pool worker (the shared task queue, or a per-job pool's). Started for
bound clients, it serves only them, each from its own data file and with its own signing key:

    python -m services.worker --client site-a --data /data/site-a.jsonl --key /keys/site-a.key

(`--client/--data/--key` repeat, in order, for several clients; or PWFF_CLIENTS, PWFF_CLIENT_DATA and
PWFF_CLIENT_KEYS, comma-separated.) Their personal state is kept across restarts in `--state-dir`
(PWFF_CLIENT_STATE_DIR; default <cache dir>/client-state).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from services.worker.worker import BoundClient, Worker
from shared.bus.rabbitmq import RabbitBus
from shared.health import Readiness, serve_probes
from shared.identity import IdentityError, TaskVerifier, UpdateSigner
from shared.metrics import dead_letter_counter
from shared.runtime import run_until_signalled
from shared.settings import Settings, configure_process
from shared.signing import BusAuth
from shared.spec import CLIENT_ID_PATTERN
from shared.store.redis import RedisStore


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def bound_clients(
    clients: Sequence[str], data: Sequence[str], keys: Sequence[str], key_dir: Path | None = None
) -> dict[str, BoundClient]:
    """The clients a worker serves, checked: one data file and one key per identity (keys default to
    `key_dir/<id>.key`, as `pwff client enroll` writes them)."""
    import re

    if len(data) != len(clients):
        raise ValueError(f"{len(clients)} client(s) but {len(data)} data file(s): give one --data per --client")
    if keys and len(keys) != len(clients):
        raise ValueError(f"{len(clients)} client(s) but {len(keys)} key(s): give one --key per --client")
    if not keys and clients and key_dir is None:
        raise ValueError("a bound client needs its key: --key FILE per --client (pwff client enroll writes it)")
    bound: dict[str, BoundClient] = {}
    for index, identity in enumerate(clients):
        if not re.match(CLIENT_ID_PATTERN, identity):
            raise ValueError(f"client identity {identity!r} must match {CLIENT_ID_PATTERN}")
        if identity in bound:
            raise ValueError(f"client {identity!r} is given twice")
        path = Path(data[index])
        if not path.is_file():
            raise ValueError(f"data file {path} of client {identity!r} does not exist")
        key = Path(keys[index]) if keys else (key_dir or Path()) / f"{identity}.key"
        bound[identity] = BoundClient(data=path, signer=UpdateSigner.from_file(identity, key))
    return bound


def parse_args(argv: Sequence[str] | None, settings: Settings) -> dict[str, BoundClient]:
    parser = argparse.ArgumentParser(prog="python -m services.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--client", action="append", default=[], help="a bound client identity this worker serves")
    parser.add_argument("--data", action="append", default=[], help="that client's data (JSON lines of text, label)")
    parser.add_argument("--key", action="append", default=[], help="that client's private key (pwff client enroll)")
    parser.add_argument("--key-dir", type=Path, default=None, help="keys as <dir>/<client>.key instead of --key")
    parser.add_argument(
        "--scheduler-key",
        default=None,
        help="the scheduler's public key (base64, given at enrollment): only tasks it signed are run",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where bound clients' personal state is kept across restarts (default <cache dir>/client-state)",
    )
    args = parser.parse_args(argv)
    if args.state_dir is not None:
        settings.client_state_dir = args.state_dir
    if args.scheduler_key is not None:
        settings.scheduler_public_key = args.scheduler_key
    clients = args.client or _split(settings.clients)
    data = args.data or _split(settings.client_data)
    keys = args.key or _split(settings.client_keys)
    try:
        if clients and not settings.scheduler_public_key:
            raise ValueError("a bound worker needs the scheduler's public key: --scheduler-key (given at enrollment)")
        if clients:
            TaskVerifier.from_text(settings.scheduler_public_key)  # a bad key stops it here, not at each task
        return bound_clients(clients, data, keys, args.key_dir)
    except (ValueError, IdentityError) as error:
        parser.error(str(error))
        raise  # parser.error exits; this keeps type checkers sure


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings(metrics_port=int(os.environ.get("PWFF_METRICS_PORT", "9101")))
    clients = parse_args(sys.argv[1:] if argv is None else argv, settings)
    configure_process(settings)
    auth = BusAuth.for_service(settings.bus_secret)
    worker = Worker(
        RabbitBus(
            settings.rabbitmq_url,
            on_dead_letter=dead_letter_counter(settings.namespace),
            # A bound client's broker user may configure only its own queue: it publishes to queues the
            # aggregator and the scheduler declared.
            declare_published=not clients,
        ),
        RedisStore(settings.redis_url),
        namespace=settings.namespace,
        cache_dir=settings.cache_dir,
        update_ttl_s=settings.update_ttl_s,
        max_message_bytes=settings.max_message_bytes,
        auth=auth,
        name=f"worker@{socket.gethostname()}:{os.getpid()}" + (f"[{','.join(clients)}]" if clients else ""),
        tasks_queue=settings.tasks_queue,
        clients=clients,
        state_dir=settings.client_state_dir,
        scheduler_key=TaskVerifier.from_text(settings.scheduler_public_key) if clients else None,
    )
    # /healthz, /readyz (every consume loop, broker and store, from the connections it already has) and /metrics.
    probes = serve_probes(
        settings.metrics_port,
        Readiness(worker.bus, worker.task_queues, worker.state.store, stale_after_s=settings.probe_stale_s),
        settings.probes_host,
    )
    try:
        run_until_signalled(worker.run)
    finally:
        if probes is not None:
            probes.close()


if __name__ == "__main__":
    main()
