"""Each bound client's own broker user, on a PRIVATE RabbitMQ node this test boots (never the shared one).

The node listens on 127.0.0.1:5681 (distribution port 5682) with its own node name, data folder and
Erlang cookie (HOME), and is stopped at the end. Users get `shared.identity.broker_permissions`, the
regexes the README tells operators to set: a client's worker consumes its own queue and publishes its
updates, and can neither read another client's tasks or the platform's queues nor declare, purge or
delete them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

from shared.bus import Queues
from shared.bus.rabbitmq import RabbitBus
from shared.identity import broker_permissions
from tests.harness import drain, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

AMQP_PORT = 5681
DIST_PORT = 5682
NAMESPACE = "pwff"


def _tool(name: str) -> str:
    # The packaged scripts under /usr/sbin switch to the rabbitmq user; the ones they wrap run as us,
    # with the folders and cookie this test owns.
    direct = Path("/usr/lib/rabbitmq/bin") / name
    found = str(direct) if direct.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (apt-get install rabbitmq-server)")
    return found


class PrivateNode:
    def __init__(self, folder: Path) -> None:
        self.node = f"pwff-fedbound-{uuid.uuid4().hex[:8]}@localhost"
        for sub in ("mnesia", "log", "home"):
            (folder / sub).mkdir()
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.default = {AMQP_PORT}\n")
        self.env = {
            **os.environ,
            "HOME": str(folder / "home"),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(AMQP_PORT),
            "RABBITMQ_DIST_PORT": str(DIST_PORT),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(folder / "pid"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(folder / "plugins-expand"),
        }
        self.log = (folder / "server.out").open("ab")
        self.process = subprocess.Popen([_tool("rabbitmq-server")], env=self.env, stdout=self.log, stderr=self.log)
        wait_until(self._up, 90, f"the private RabbitMQ node {self.node}")
        self.ctl("await_startup")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the private RabbitMQ node exited with {self.process.returncode}")
        return (
            subprocess.run(
                [_tool("rabbitmqctl"), "-q", "-n", self.node, "status"], env=self.env, capture_output=True
            ).returncode
            == 0
        )

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [_tool("rabbitmqctl"), "-q", "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def url(self, user: str, password: str) -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{AMQP_PORT}/%2F"

    def stop(self) -> None:
        subprocess.run(
            [_tool("rabbitmqctl"), "-q", "-n", self.node, "stop"], env=self.env, capture_output=True, timeout=60
        )
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateNode]:
    private = PrivateNode(tmp_path_factory.mktemp("rabbitmq-private"))
    try:
        for client in ("site-a", "site-b"):
            private.ctl("add_user", client, f"{client}-secret")
            private.ctl("set_permissions", "-p", "/", client, *broker_permissions(NAMESPACE, client))
        yield private
    finally:
        private.stop()


def _refused(
    node: PrivateNode, user: str, action: Callable[[pika.adapters.blocking_connection.BlockingChannel], object]
) -> None:
    """`action` on a fresh channel of `user` is refused by the broker with ACCESS_REFUSED (403)."""
    connection = pika.BlockingConnection(pika.URLParameters(node.url(user, f"{user}-secret")))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            action(connection.channel())
        assert refused.value.reply_code == 403, refused.value
    finally:
        connection.close()


def test_a_clients_broker_user_reaches_only_its_own_queue(node: PrivateNode) -> None:
    queues = Queues(NAMESPACE)
    platform = RabbitBus(node.url("guest", "guest"))
    for queue in (queues.aggregate, queues.events):
        platform.depth(queue)  # the aggregator and the scheduler declare what they consume
    platform.publish(queues.client_tasks("site-a"), b"task for a")
    platform.publish(queues.client_tasks("site-b"), b"task for b")

    site_a = RabbitBus(node.url("site-a", "site-a-secret"), declare_published=False)
    try:
        assert drain(site_a, queues.client_tasks("site-a")) == [b"task for a"]  # declares and reads its own queue
        site_a.publish(queues.aggregate, b"update of a")  # its uploads go through
        site_a.publish(queues.events, b"evaluation of a")
        wait_until(lambda: platform.depth(queues.aggregate) == 1 and platform.depth(queues.events) == 1, 10, "uploads")
    finally:
        site_a.close()

    b_queue, aggregate = queues.client_tasks("site-b"), queues.aggregate
    _refused(node, "site-a", lambda ch: ch.basic_get(b_queue))  # another client's tasks
    _refused(node, "site-a", lambda ch: ch.basic_get(aggregate))  # the platform's queues
    _refused(node, "site-a", lambda ch: ch.basic_get(queues.events))
    _refused(node, "site-a", lambda ch: ch.queue_purge(b_queue))
    _refused(node, "site-a", lambda ch: ch.queue_delete(aggregate))
    # A declare of a queue it does not own is refused: why a bound worker publishes without declaring.
    _refused(node, "site-a", lambda ch: ch.queue_declare(aggregate, durable=True))
    _refused(node, "site-a", lambda ch: ch.exchange_declare("pwff.rogue", exchange_type="fanout"))
    assert platform.depth(b_queue) == 1  # site-b's task is still there, for site-b alone
    site_b = RabbitBus(node.url("site-b", "site-b-secret"), declare_published=False)
    assert drain(site_b, b_queue) == [b"task for b"]
    site_b.close()

    node.ctl("delete_user", "site-b")  # revoking the client's broker user cuts it off at once
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(node.url("site-b", "site-b-secret")))
    platform.close()
