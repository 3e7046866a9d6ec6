"""The gateway's way onto Kafka: mirrored prompts and served responses in the background, feedback and enqueued
prompts durably.

A client of /v1/chat/completions never waits on Kafka: a mirrored prompt, and
the record of a response kept for feedback (odpo.served), go into a bounded
queue that a thread publishes; a full queue or a broker error drops the
message and counts it. /v1/feedback and /v1/prompts do wait (in a
worker thread, bounded by `publish_timeout_s`), because their answer says
the message is stored. The producer is created lazily and again after an
error, so the gateway starts and serves while the broker is away.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading

from kafka import KafkaProducer
from kafka.errors import KafkaError

from core.bus import make_producer, send
from core.contracts import TOPIC_PROMPTS, TOPIC_SERVED, PromptEvent, ServedRecord, _Message
from core.topics import topic_name
from service.gateway.metrics import MIRROR_DROPPED, MIRRORED, SERVED_UNPUBLISHED

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """Kafka did not take the message in time."""


class Outbox:
    def __init__(self, bootstrap: str, queue_size: int, publish_timeout_s: float):
        self.bootstrap = bootstrap
        self.publish_timeout_s = publish_timeout_s
        self._queue: queue.Queue[tuple[str, str, _Message]] = queue.Queue(maxsize=queue_size)  # topic, key, msg
        self._producer: KafkaProducer | None = None
        self._producer_lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="odpo-gateway-mirror", daemon=True)

    def start(self) -> Outbox:
        self._thread.start()
        return self

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=10)
        with self._producer_lock:
            if self._producer is not None:
                self._producer.close(timeout=5)
                self._producer = None

    # -- for request handlers ------------------------------------------------------------------------
    def mirror(self, event: PromptEvent) -> bool:
        """Queue a client prompt for odpo.prompts without waiting; False (counted) when the queue is full."""
        return self._put(topic_name(TOPIC_PROMPTS), event.id, event)

    def served(self, record: ServedRecord) -> bool:
        """Queue a served response for odpo.served without waiting; False (counted) when the queue is full."""
        return self._put(topic_name(TOPIC_SERVED), record.id, record)

    def publish(self, topic: str, items: list[tuple[str, _Message]]) -> None:
        """Publish (key, message) items to `topic` (a full name, `topic_name`) and wait until Kafka has them all
        (blocking: call from a worker thread)."""
        try:
            producer = self._connect()
            futures = [send(producer, topic, key, msg.to_bytes()) for key, msg in items]  # signed (core/signing.py)
            for future in futures:
                future.get(timeout=self.publish_timeout_s)
        except (KafkaError, OSError) as exc:
            self._drop_producer()
            raise BrokerUnavailable(f"the broker did not take the message: {exc.__class__.__name__}") from exc

    # -- internals -----------------------------------------------------------------------------------
    def _connect(self) -> KafkaProducer:
        with self._producer_lock:
            if self._producer is None:
                # core.bus.make_producer, plus a bound on how long send() may block for metadata.
                wait_ms = int(self.publish_timeout_s * 1000)
                self._producer = make_producer(self.bootstrap, max_block_ms=wait_ms, bootstrap_timeout_ms=wait_ms)
            return self._producer

    def _drop_producer(self) -> None:
        with self._producer_lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):  # a broken producer is replaced either way
                producer.close(timeout=1)

    def _put(self, topic: str, key: str, message: _Message) -> bool:
        try:
            self._queue.put_nowait((topic, key, message))
            return True
        except queue.Full:
            _dropped(topic, "queue_full")
            return False

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                topic, key, message = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                producer = self._connect()
                future = send(producer, topic, key, message.to_bytes())  # signed (core/signing.py)
                if topic == topic_name(TOPIC_PROMPTS):
                    future.add_callback(lambda _meta: MIRRORED.inc())
                future.add_errback(lambda _exc, topic=topic: _dropped(topic, "broker_error"))
                if self._queue.empty():
                    producer.flush(timeout=self.publish_timeout_s)
            except (KafkaError, OSError) as exc:
                _dropped(topic, "broker_error")
                log.warning("publishing %s to %s failed: %s", key, topic, exc)
                self._drop_producer()
                self._halt.wait(1.0)


def _dropped(topic: str, reason: str) -> None:
    (SERVED_UNPUBLISHED if topic == topic_name(TOPIC_SERVED) else MIRROR_DROPPED).labels(reason).inc()
