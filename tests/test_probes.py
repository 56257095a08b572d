"""Worker and aggregator probes: /healthz, /readyz and /metrics answered by the service itself.

The end-to-end tests run `python -m services.worker` and `python -m services.aggregator` (as the chart
does) against the real RabbitMQ and Redis, each reached through a TCP proxy this test owns: cutting a
proxy takes the broker (or the store) away from the service without touching the shared servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from services.worker.worker import BoundClient, Worker
from shared import identity
from shared.bus import Queues
from shared.bus.memory import MemoryBus
from shared.bus.rabbitmq import RabbitBus
from shared.health import ProbeServer, Readiness
from shared.metrics import TASKS_PROCESSED
from shared.settings import Settings
from shared.store.memory import MemoryStore
from shared.store.redis import RedisStore
from tests.bound import enroll_clients
from tests.harness import REPO, free_port, wait_until
from tests.test_helm import RELEASE, helm, render  # noqa: F401  (the chart tests' helm and render fixtures)


def _get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            body = response.read()
            status = response.status
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        body, status, kind = error.read(), error.code, error.headers.get("Content-Type", "")
    return status, json.loads(body) if kind.startswith("application/json") else body.decode()


class TcpProxy:
    """127.0.0.1:<port> forwarded to a target; `cut()` drops every connection and refuses new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._listener is not None:
            # shutdown first: it wakes the thread blocked in accept(), which close() alone would not (and the
            # port would stay bound).
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.cut()


def _via(url: str, proxy: TcpProxy) -> str:
    """`url` with its host and port replaced by the proxy's, credentials and path kept."""
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{proxy.port}"))


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", int(parts.port or 0)


# -- the probe server over the in-process bus and store ---------------------------------------


@pytest.fixture
def memory_probes() -> Iterator[tuple[ProbeServer, MemoryBus, str]]:
    bus, queue = MemoryBus(), "probe-test.tasks"
    server = ProbeServer(0, Readiness(bus, queue, MemoryStore()), host="127.0.0.1")
    yield server, bus, queue
    server.close()


def test_readyz_follows_the_consume_loop(memory_probes: tuple[ProbeServer, MemoryBus, str]) -> None:
    server, bus, queue = memory_probes
    assert _get(server.port, "/readyz") == (503, {"ready": False, "consumer": False, "broker": False, "store": True})
    stop = threading.Event()
    loop = threading.Thread(target=bus.consume, args=(queue, lambda body: None, stop), daemon=True)
    loop.start()
    wait_until(lambda: _get(server.port, "/readyz")[0] == 200, 5, "ready while consuming")
    assert _get(server.port, "/readyz")[1] == {"ready": True, "consumer": True, "broker": True, "store": True}
    stop.set()
    loop.join(timeout=5)
    assert _get(server.port, "/readyz")[0] == 503  # the loop ended: nothing consumes the queue any more
    assert _get(server.port, "/healthz") == (200, {"status": "ok"})


def test_readyz_of_a_worker_serving_several_clients_watches_every_queue(tmp_path: Path) -> None:
    """A worker serving site-a and site-b runs a consume loop per client queue: both must be up."""
    _, enrolled = enroll_clients(tmp_path, ("site-a", "site-b"))
    clients = {c.id: BoundClient(c.data, identity.UpdateSigner.from_file(c.id, c.key)) for c in enrolled}
    bus = MemoryBus()
    worker = Worker(bus, MemoryStore(), cache_dir=tmp_path / "cache", clients=clients)
    readiness = Readiness(bus, worker.task_queues, worker.state.store)
    stop_a, stop_b = threading.Event(), threading.Event()
    loops = [
        threading.Thread(target=bus.consume, args=(queue, lambda body: None, stop), daemon=True)
        for queue, stop in zip(worker.task_queues, (stop_a, stop_b), strict=True)
    ]
    loops[0].start()
    time.sleep(0.2)
    assert readiness.checks()["consumer"] is False  # site-b's loop is not up yet
    loops[1].start()
    wait_until(lambda: readiness.checks() == {"consumer": True, "broker": True, "store": True}, 5, "both loops")
    stop_b.set()  # site-b's loop ends while site-a's goes on: the worker is not ready any more
    loops[1].join(timeout=5)
    assert readiness.checks()["consumer"] is False and readiness.checks()["broker"] is False
    stop_a.set()
    loops[0].join(timeout=5)
    readiness.close()


@pytest.mark.parametrize("path", ["/", "/health", "/readyz/x", "/metrics/x", "/healthz2"])
def test_unknown_paths_are_404(memory_probes: tuple[ProbeServer, MemoryBus, str], path: str) -> None:
    status, body = _get(memory_probes[0].port, path)
    assert status == 404 and "no such path" in body["detail"]


def test_metrics_stay_on_their_own_path(memory_probes: tuple[ProbeServer, MemoryBus, str]) -> None:
    status, text = _get(memory_probes[0].port, "/metrics")
    assert status == 200
    assert f"# TYPE {TASKS_PROCESSED._name}_total counter" in text
    assert 'pwff_tasks_processed_total{outcome="done"}' in text


def test_a_store_that_stops_answering_goes_stale() -> None:
    now = [100.0]
    answers = [True]
    store = MemoryStore()
    store.ping = lambda: answers[0]  # type: ignore[method-assign]
    bus = MemoryBus()
    readiness = Readiness(bus, "q", store, stale_after_s=5, ping_every_s=0.05, clock=lambda: now[0])
    assert readiness.checks()["store"] is True
    answers[0] = False
    wait_until(lambda: readiness.checks()["store"] is False, 5, "a failed PING counts at once")
    answers[0] = True
    wait_until(lambda: readiness.checks()["store"] is True, 5, "a PING that answers again")

    def hangs() -> bool:
        time.sleep(3600)
        return True

    store.ping = hangs  # type: ignore[method-assign]  # no new answer from here on
    time.sleep(0.2)
    now[0] += 6
    assert readiness.checks()["store"] is False  # the last answer is too old
    readiness.close()


# -- the real services, through proxies --------------------------------------------------------


class Service:
    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        handle = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            cwd=REPO,
            env={**env, "PWFF_METRICS_PORT": str(self.port)},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> tuple[int, Any]:
        if self.process.poll() is not None:
            raise AssertionError(f"the service exited with {self.process.returncode}: {self.log.read_text()[-3000:]}")
        try:
            return _get(self.port, path)
        except (urllib.error.URLError, ConnectionError):
            return 0, None

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _ready(service: Service) -> bool:
    return service.get("/readyz")[0] == 200


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    settings = Settings()
    broker = TcpProxy(*_target(settings.rabbitmq_url))
    store = TcpProxy(*_target(settings.redis_url))
    namespace = f"probes-{uuid.uuid4().hex[:8]}"
    logs = tmp_path_factory.mktemp("probe-logs")
    env = {
        **os.environ,
        "PWFF_NAMESPACE": namespace,
        "PWFF_RABBITMQ_URL": _via(settings.rabbitmq_url, broker),
        "PWFF_REDIS_URL": _via(settings.redis_url, store),
        "PWFF_PROBE_STALE_S": "3",
        "PWFF_BUS_SECRET": "probe-test-bus-secret-0123",
        "PWFF_TORCH_THREADS": "1",
        "PWFF_CACHE_DIR": str(tmp_path_factory.mktemp("probe-cache")),
        "HF_HUB_OFFLINE": "1",
        # The probes listen where the API does (PWFF_METRICS_HOST unset): not on every interface.
        "PWFF_API_HOST": "127.0.0.1",
    }
    running = {name: Service(name, env, logs / f"{name}.log") for name in ("worker", "aggregator")}
    try:
        for service in running.values():
            wait_until(partial(_ready, service), 180, f"{service.log.stem} ready")
        yield {"broker": broker, "store": store, **running}
    finally:
        for service in running.values():
            service.close()
        broker.close()
        store.close()
        bus = RabbitBus(settings.rabbitmq_url)
        bus.delete_queues(*Queues(namespace).all)
        bus.close()
        RedisStore(settings.redis_url).delete_prefix(f"{namespace}:")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["worker", "aggregator"])
def test_unready_without_the_broker_and_ready_again_after(services: dict[str, Any], name: str) -> None:
    service: Service = services[name]
    proxy: TcpProxy = services["broker"]
    wait_until(lambda: service.get("/readyz")[0] == 200, 40, f"{name} ready")
    assert service.get("/readyz") == (200, {"ready": True, "consumer": True, "broker": True, "store": True})
    proxy.cut()
    try:
        wait_until(lambda: service.get("/readyz")[0] == 503, 20, f"{name} unready without its broker")
        status, body = service.get("/readyz")
        assert body == {"ready": False, "consumer": True, "broker": False, "store": True}, (status, body)
        assert service.get("/healthz") == (200, {"status": "ok"})  # alive: no restart for a broker outage
        assert service.get("/metrics")[0] == 200
    finally:
        proxy.restore()
    wait_until(lambda: service.get("/readyz")[0] == 200, 40, f"{name} ready again once it reconnected")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["worker", "aggregator"])
def test_unready_without_the_store_and_ready_again_after(services: dict[str, Any], name: str) -> None:
    service: Service = services[name]
    proxy: TcpProxy = services["store"]
    # The services share the proxies: the one tested before may have left this one reconnecting.
    wait_until(lambda: service.get("/readyz")[0] == 200, 40, f"{name} ready")
    proxy.cut()
    try:
        wait_until(lambda: service.get("/readyz")[0] == 503, 20, f"{name} unready without its store")
        assert service.get("/readyz")[1] == {"ready": False, "consumer": True, "broker": True, "store": False}
        assert service.get("/healthz") == (200, {"status": "ok"})
    finally:
        proxy.restore()
    wait_until(lambda: service.get("/readyz")[0] == 200, 40, f"{name} ready again once the store answers")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["worker", "aggregator"])
def test_service_probe_paths(services: dict[str, Any], name: str) -> None:
    service: Service = services[name]
    assert service.get("/healthz") == (200, {"status": "ok"})
    status, text = service.get("/metrics")
    assert status == 200 and "pwff_messages_dead_lettered_total" in text
    assert service.get("/nothing-here")[0] == 404


@pytest.mark.integration
@pytest.mark.parametrize("name", ["worker", "aggregator"])
def test_probes_listen_only_where_the_settings_say(services: dict[str, Any], name: str) -> None:
    import psutil

    service: Service = services[name]
    listening = [
        c.laddr
        for c in psutil.Process(service.process.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == service.port
    ]
    assert [address.ip for address in listening] == ["127.0.0.1"], listening
    assert Settings(api_host="10.1.2.3").probes_host == "10.1.2.3"
    assert Settings(api_host="10.1.2.3", metrics_host="0.0.0.0").probes_host == "0.0.0.0"


# -- the chart probes these paths ---------------------------------------------------------------


@pytest.mark.parametrize("values", [[], ["-f", "deploy/helm/pwff/ci/production-values.yaml"]])
def test_chart_probes_liveness_and_readiness_apart(render: Any, values: list[str]) -> None:  # noqa: F811
    args = [v if not v.endswith(".yaml") else str(REPO / v) for v in values]
    docs = render(*args)
    expected = {"scheduler": "http", "worker": "metrics", "aggregator": "metrics"}
    for component, port in expected.items():
        (deployment,) = [
            d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{RELEASE}-{component}"
        ]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}, component
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}, component
