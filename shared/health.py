"""Liveness and readiness of a service, answered by the service itself, without a connection per probe.

Readiness has three checks:

- `consumer`: the service's consume loop is running (`Bus.consumer_status`);
- `broker`: that loop holds an open connection to the broker and exchanged data with it (messages or
  heartbeats, at least every half second, also while a handler runs) within `stale_after_s`;
- `store`: the store answered a PING within `stale_after_s`. The PING runs on the store's own pooled
  connection, every `ping_every_s` on a background thread, whatever the probe rate; a probe only reads
  the last answer, so a store that hangs makes the probe say so instead of hanging it.

`serve_probes` answers /healthz (liveness: the process answers), /readyz (200 or 503 with the checks as
JSON) and /metrics (Prometheus) on one port; any other path is a 404.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from shared.bus import Bus
from shared.store import Store

log = logging.getLogger(__name__)

STALE_AFTER_S = 15.0
"""A consumer with no broker I/O, or a store with no PING answer, for this long is not ready."""


class Checks(Protocol):
    """What /readyz asks: named checks, all true when ready (`Readiness`, or a service's own)."""

    def checks(self) -> dict[str, bool]: ...

    def close(self) -> None: ...


class Readiness:
    """The readiness checks of a process's consume loops (`bus` on `queue`, or on each of several
    queues: a worker serving several bound clients consumes one per client) and one store."""

    def __init__(
        self,
        bus: Bus,
        queue: str | Sequence[str],
        store: Store,
        stale_after_s: float = STALE_AFTER_S,
        ping_every_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.queues = (queue,) if isinstance(queue, str) else tuple(queue)
        self.store = store
        self.stale_after_s = stale_after_s
        self.ping_every_s = ping_every_s
        self.clock = clock
        self._store_ok_at: float | None = None  # when the last PING that answered True finished
        self._store_answered = threading.Event()
        self._pinger: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _fresh(self, at: float | None) -> bool:
        return at is not None and self.clock() - at <= self.stale_after_s

    def checks(self) -> dict[str, bool]:
        statuses = [self.bus.consumer_status(queue) for queue in self.queues]
        # An in-process bus has no I/O to go stale (last_io_s None): connected is all there is. Every loop
        # must be up: a client whose loop died would otherwise be absent while the process looks ready.
        broker = all(
            status.running and status.connected and (status.last_io_s is None or self._fresh(status.last_io_s))
            for status in statuses
        )
        consumer = all(status.running for status in statuses)
        return {"consumer": consumer, "broker": broker, "store": self._store_ready()}

    def _store_ready(self) -> bool:
        with self._lock:
            if self._pinger is None:
                self._pinger = threading.Thread(target=self._ping_forever, name="readiness-ping", daemon=True)
                self._pinger.start()
        # The first probe waits briefly for the first answer rather than report a store it never asked.
        self._store_answered.wait(timeout=min(1.0, self.stale_after_s))
        return self._fresh(self._store_ok_at)

    def _ping_forever(self) -> None:
        while not self._stop.is_set():
            try:
                ok = self.store.ping()
            except Exception:
                log.debug("store ping failed", exc_info=True)
                ok = False
            if ok:
                self._store_ok_at = self.clock()
            else:
                self._store_ok_at = None
            self._store_answered.set()
            self._stop.wait(self.ping_every_s)

    def close(self) -> None:
        self._stop.set()


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a probe being answered never holds a stopping process


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not worth a log line
        pass


Environ = dict[str, Any]
StartResponse = Callable[..., Any]


class ProbeServer:
    """/healthz, /readyz and /metrics of one service on one port (a daemon thread)."""

    def __init__(self, port: int, readiness: Checks, host: str) -> None:
        self.readiness = readiness
        self._metrics = make_wsgi_app()
        self._server = make_server(host, port, self._app, _ThreadingWSGIServer, handler_class=_QuietHandler)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="probes", daemon=True)
        self._thread.start()

    def _app(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            return _json(start_response, 200, {"status": "ok"})
        if path == "/readyz":
            checks = self.readiness.checks()
            ready = all(checks.values())
            return _json(start_response, 200 if ready else 503, {"ready": ready, **checks})
        return _json(start_response, 404, {"detail": f"no such path: {path} (try /healthz, /readyz, /metrics)"})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.readiness.close()


_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


def _json(start_response: StartResponse, code: int, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        f"{code} {_REASONS[code]}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Cache-Control", "no-store")],
    )
    return [data]


def serve_probes(port: int, readiness: Checks, host: str) -> ProbeServer | None:
    """Serve the probes and /metrics on `host`:`port` (port 0: don't). `host` is the settings' `probes_host`,
    so a deployment that binds its API to one interface does not expose the metrics on every other."""
    if port <= 0:
        return None
    return ProbeServer(port, readiness, host=host)
