"""A private redis-server and a private RabbitMQ node, owned by one test run, that it may kill and restart.

The shared brokers (127.0.0.1:5672 and :6379) are never touched: each private one listens on a port of
its own range (Redis 6391-6399, AMQP 5691-5699), and the RabbitMQ node has its own node name,
distribution port and data folder, in a temp folder the caller gives. Used by the fault suite
(tests/integration/test_faults.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pika
import pika.exceptions
import redis

REDIS_PORTS = range(6391, 6400)
AMQP_PORTS = range(5691, 5700)


def port_in(ports: range, avoid: tuple[int, ...] = ()) -> int:
    """The first port of `ports` nothing listens on (nor is about to: bound without SO_REUSEADDR)."""
    for port in ports:
        if port in avoid:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def _required(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is missing (scripts/ensure-services.sh installs it)")
    return path


class PrivateRedis:
    """redis-server on 127.0.0.1:<6391-6399> with its data in `workdir`; AOF as the chart configures it
    (appendonly yes, appendfsync everysec) unless `persistent` is False (then nothing is ever written)."""

    def __init__(self, workdir: Path, persistent: bool = True) -> None:
        self.server = _required("redis-server")
        self.workdir = workdir
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = port_in(REDIS_PORTS)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def _config(self) -> list[str]:
        durability = (
            ["--appendonly", "yes", "--appendfsync", "everysec", "--aof-use-rdb-preamble", "yes"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        return [
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data), "--save", "",
            "--maxmemory-policy", "noeviction", *durability,
        ]  # fmt: skip

    def start(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen([self.server, *self._config()], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=2).ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on {self.port}; see {self.workdir / 'redis.log'}")

    def stop(self, how: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM: Redis's own shutdown (the AOF is flushed and fsync'd, as a pod restart does); SIGKILL: a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(how)
            self.process.wait(timeout=30)
        self.process = None

    def restart(self, keep_data: bool = True, down_s: float = 1.0) -> None:
        """Stop, stay down `down_s`, start again; without `keep_data` the server comes back empty, as a
        Redis without persistence does after any restart."""
        self.stop()
        if not keep_data:
            shutil.rmtree(self.data)
            self.data.mkdir()
        time.sleep(down_s)
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    def close(self) -> None:
        self.stop(signal.SIGKILL)


class PrivateRabbit:
    """A RabbitMQ node of its own: node name, AMQP port (5691-5699), distribution port and mnesia folder in a
    temp folder of its own (the node runs as the rabbitmq user, which must reach it). Restarting it keeps its
    durable queues and persistent messages, as a broker pod restart does."""

    def __init__(self) -> None:
        self.server = _required("rabbitmq-server")
        self.ctl = _required("rabbitmqctl")
        self.workdir = workdir = Path(tempfile.mkdtemp(prefix="pwff-faults-rabbitmq-"))
        self.port = port_in(AMQP_PORTS)
        self.dist_port = port_in(range(25691, 25700))
        self.node = f"pwfffaults{os.getpid()}x{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        (workdir / "mnesia").mkdir(exist_ok=True)
        (workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.port}\nloopback_users = none\nconsumer_timeout = 86400000\n"
        )
        (workdir / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:  # Debian's wrapper runs the node as the rabbitmq user
            workdir.chmod(0o755)
            for path in [workdir, *workdir.rglob("*")]:
                shutil.chown(path, "rabbitmq", "rabbitmq")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_LOGS": "-",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, timeout_s: float = 180) -> None:
        with (self.workdir / "node.log").open("ab") as out:
            self.process = subprocess.Popen(
                [self.server],
                env=self.env,
                cwd=self.workdir,  # where a failed boot writes its erl_crash.dump
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        params = pika.URLParameters(self.url)
        while True:
            try:
                pika.BlockingConnection(params).close()
                return
            except pika.exceptions.AMQPConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = (self.workdir / "node.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the private RabbitMQ node did not start:\n{tail}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        subprocess.run([self.ctl, "-n", self.node, "stop"], env=self.env, capture_output=True, timeout=120)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
