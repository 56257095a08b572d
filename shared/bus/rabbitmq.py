"""The bus on RabbitMQ (pika).

Durable queues, persistent messages, publisher confirms, prefetch 1 and a dead-letter
queue beside every queue. A handler runs on its own thread while the connection's
thread keeps pumping heartbeats, so a task that trains for minutes does not get its
connection dropped; the ack (or reject) is sent only after the handler returns.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from shared.bus import ConsumerStatus, DeadLetterHook, Handler, Queues
from shared.bus.policy import DEFAULT_POLICY, Ack, DeadLetter, FailureTracker, Retry, RetryPolicy

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    ConnectionError,
    OSError,
)


class RabbitBus:
    def __init__(
        self,
        url: str,
        on_dead_letter: DeadLetterHook | None = None,
        heartbeat_s: int = 30,
        policy: RetryPolicy = DEFAULT_POLICY,
        declare_published: bool = True,
    ) -> None:
        self._params = pika.URLParameters(url)
        self._declare_published = declare_published
        """False: publish without declaring the target queue, which its consumer (a platform service) declared.
        A bound client's broker user may configure its own queue only, and a declare of any other is refused."""
        self._params.heartbeat = heartbeat_s
        self._params.blocked_connection_timeout = 60
        self._on_dead_letter = on_dead_letter
        self.policy = policy
        self._publish_lock = threading.Lock()
        self._publish_conn: pika.BlockingConnection | None = None
        self._publish_channel: BlockingChannel | None = None
        self._declared: set[str] = set()
        # Per consumed queue, what the readiness probe reads: set by the consume loop, never by a probe.
        self._consumers: dict[str, ConsumerStatus] = {}

    # -- topology -------------------------------------------------------------------------

    def _declare(self, channel: BlockingChannel, queue: str) -> None:
        """Declare a work queue with its dead-letter queue; a dead-letter queue itself has none."""
        if queue.endswith(".dead"):
            channel.queue_declare(queue=queue, durable=True)
            return
        channel.queue_declare(queue=Queues.dead(queue), durable=True)
        channel.queue_declare(
            queue=queue,
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": Queues.dead(queue)},
        )

    def _connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self._params)

    # -- publishing -----------------------------------------------------------------------

    def _publisher(self) -> BlockingChannel:
        if self._publish_channel is None or not self._publish_channel.is_open:
            if self._publish_conn is not None and self._publish_conn.is_open:
                try:
                    self._publish_conn.close()
                except Exception:
                    log.debug("closing a broken publisher connection failed", exc_info=True)
            self._publish_conn = self._connect()
            self._publish_channel = self._publish_conn.channel()
            self._publish_channel.confirm_delivery()
            self._declared.clear()
        return self._publish_channel

    @retry(
        retry=retry_if_exception_type(_CONNECTION_ERRORS),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=stop_after_attempt(8),
        reraise=True,
    )
    def publish(self, queue: str, body: bytes) -> None:
        with self._publish_lock:
            try:
                channel = self._publisher()
                if queue not in self._declared and self._declare_published:
                    self._declare(channel, queue)
                    self._declared.add(queue)
                channel.basic_publish(
                    exchange="",
                    routing_key=queue,
                    body=bytes(body),  # pika takes only bytes (or str); MemoryBus takes any bytes-like
                    properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
                    mandatory=True,
                )
            except _CONNECTION_ERRORS:
                self._publish_channel = None
                raise

    # -- consuming ------------------------------------------------------------------------

    def consumer_status(self, queue: str) -> ConsumerStatus:
        return self._consumers.get(queue, ConsumerStatus())

    def _consumer_io(self, queue: str) -> None:
        self._consumers[queue] = ConsumerStatus(running=True, connected=True, last_io_s=time.monotonic())

    def consume(self, queue: str, handler: Handler, stop: threading.Event) -> None:
        self._consumers[queue] = ConsumerStatus(running=True)
        try:
            self._consume(queue, handler, stop)
        finally:
            self._consumers[queue] = ConsumerStatus()

    def _consume(self, queue: str, handler: Handler, stop: threading.Event) -> None:
        backoff = 0.5
        tracker = FailureTracker(self.policy)  # kept across reconnections
        while not stop.is_set():
            connection: pika.BlockingConnection | None = None
            try:
                connection = self._connect()
                channel = connection.channel()
                self._declare(channel, queue)
                channel.basic_qos(prefetch_count=1)
                backoff = 0.5
                self._consumer_io(queue)
                for method, _properties, body in channel.consume(queue, inactivity_timeout=0.5):
                    self._consumer_io(queue)  # a message, or half a second of pumping with nothing to deliver
                    if stop.is_set():
                        break
                    if method is None:
                        continue
                    self._handle(connection, channel, queue, method, body, handler, tracker)
                try:
                    channel.cancel()
                except Exception:
                    log.debug("cancelling the consumer failed", exc_info=True)
            except _CONNECTION_ERRORS as error:
                self._consumers[queue] = ConsumerStatus(running=True)
                log.warning("lost the broker while consuming %s (%s); reconnecting in %.1fs", queue, error, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                if connection is not None and connection.is_open:
                    try:
                        connection.close()
                    except Exception:
                        log.debug("closing the consumer connection failed", exc_info=True)

    def _handle(
        self,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        queue: str,
        method: Any,
        body: bytes,
        handler: Handler,
        tracker: FailureTracker,
    ) -> None:
        outcome: dict[str, BaseException | None] = {"error": None}

        def run() -> None:
            try:
                handler(body)
            except BaseException as error:
                outcome["error"] = error

        thread = threading.Thread(target=run, name=f"handle-{queue}", daemon=True)
        thread.start()
        # Pump heartbeats while the handler runs, but notice its end within ~20 ms: waiting out a
        # fixed window here would hold every message (prefetch 1) for up to that long.
        while thread.is_alive():
            connection.process_data_events(time_limit=0)
            self._consumer_io(queue)
            thread.join(timeout=0.02)
        error = outcome["error"]
        decision = tracker.decide(body, error)
        if isinstance(decision, Ack):
            channel.basic_ack(method.delivery_tag)
        elif isinstance(decision, DeadLetter):
            self._dead_letter(channel, queue, method, decision.reason)
        elif isinstance(decision, Retry):
            log.error(
                "handler failed on %s (failure %d of %d); redelivering in %.2fs",
                queue,
                decision.failures,
                self.policy.max_failures,
                decision.delay_s,
                exc_info=error,
            )
            connection.sleep(decision.delay_s)  # pumps heartbeats while it waits
            channel.basic_nack(method.delivery_tag, requeue=True)

    def _dead_letter(self, channel: BlockingChannel, queue: str, method: Any, reason: str) -> None:
        log.warning("dead-lettering a message from %s: %s", queue, reason)
        channel.basic_nack(method.delivery_tag, requeue=False)
        if self._on_dead_letter is not None:
            self._on_dead_letter(queue, reason)

    # -- inspection -----------------------------------------------------------------------

    def _with_channel(self, action: Any) -> Any:
        connection = self._connect()
        try:
            channel = connection.channel()
            return action(channel)
        finally:
            connection.close()

    def depth(self, queue: str) -> int:
        def count(channel: BlockingChannel) -> int:
            self._declare(channel, queue)
            return int(channel.queue_declare(queue=queue, passive=True).method.message_count)

        return int(self._with_channel(count))

    def consumers(self, queue: str) -> int:
        # A passive declare answers with consumer_count too: no management plugin needed.
        def count(channel: BlockingChannel) -> int:
            self._declare(channel, queue)
            return int(channel.queue_declare(queue=queue, passive=True).method.consumer_count)

        return int(self._with_channel(count))

    def purge(self, queue: str) -> None:
        def purge(channel: BlockingChannel) -> None:
            self._declare(channel, queue)
            channel.queue_purge(queue)

        self._with_channel(purge)

    def ping(self) -> bool:
        try:
            self._with_channel(lambda channel: None)
            return True
        except _CONNECTION_ERRORS:
            return False

    def delete_queues(self, *queues: str) -> None:
        """Remove queues and their dead-letter queues (tests use a namespace per run)."""

        def delete(channel: BlockingChannel) -> None:
            for queue in queues:
                channel.queue_delete(queue)
                channel.queue_delete(Queues.dead(queue))

        self._with_channel(delete)

    def close(self) -> None:
        with self._publish_lock:
            if self._publish_conn is not None and self._publish_conn.is_open:
                try:
                    self._publish_conn.close()
                except Exception:
                    log.debug("closing the publisher failed", exc_info=True)
            self._publish_conn = None
            self._publish_channel = None
