"""All three services in one process, on the in-process bus and store (`pwff run`).

The same Scheduler, Aggregator and Worker classes as the distributed deployment; only
the bus and store differ. Useful for demos, tests and single-machine experiments.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from services.aggregator.aggregator import Aggregator
from services.scheduler.core import Scheduler
from services.worker.worker import Worker
from shared.bus.memory import MemoryBus
from shared.metrics import count_dead_letter
from shared.signing import BusAuth
from shared.state import JobState
from shared.store.memory import MemoryStore


class EmbeddedCluster:
    def __init__(
        self, cache_dir: Path, workers: int = 1, namespace: str = "pwff", store: MemoryStore | None = None
    ) -> None:
        self.bus = MemoryBus(on_dead_letter=count_dead_letter)
        self.store = store if store is not None else MemoryStore()
        # One process, one random secret: messages are sealed and checked exactly as between service processes.
        self.auth = auth = BusAuth.ephemeral()
        """What a service added to this cluster (e.g. another Worker) seals and checks its messages with."""
        self.scheduler = Scheduler(self.bus, self.store, namespace=namespace, tick_s=0.2, auth=auth)
        self.aggregator = Aggregator(self.bus, self.store, namespace=namespace, cache_dir=cache_dir, auth=auth)
        self.workers = [
            Worker(self.bus, self.store, namespace=namespace, cache_dir=cache_dir, name=f"worker-{i}", auth=auth)
            for i in range(workers)
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> EmbeddedCluster:
        loops: list[tuple[str, Callable[[threading.Event], None]]] = [
            ("scheduler", self.scheduler.run),
            ("aggregator", self.aggregator.run),
            *((worker.name, worker.run) for worker in self.workers),
        ]
        for name, loop in loops:
            thread = threading.Thread(target=loop, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def wait(
        self, job_id: str, on_update: Callable[[dict[str, Any]], None] | None = None, poll_s: float = 0.2
    ) -> dict[str, Any]:
        """Block until the job ends; `on_update` sees the job view whenever it changes."""
        last: Any = None
        while True:
            job = self.scheduler.get_job(job_id)
            marker = (job["state"], job["round"], len(job["metrics"]))
            if marker != last and on_update is not None:
                on_update(job)
            last = marker
            if JobState(job["state"]).final:
                return job
            time.sleep(poll_s)
