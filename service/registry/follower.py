"""A reader of the gate's decisions: the control topic, read from its start, and a book kept equal to it.

The gate (service/gate/) is the one writer of the policy registry; it
publishes every change on the compacted, one-partition `control_topic`
(`odpo.control`; the messages are described in control_log.py). Every gateway
replica runs a `RegistryFollower`: a thread that reads the topic from its
start (no consumer group, nothing committed) and, once it has read to the
end, makes its book the newest accepted head's state, then every newer one
as it arrives (about 0.1 s after the gate wrote it). A gateway therefore
holds no decision of its own: a restarted or added replica routes like the
others as soon as it has read the topic.

The gate runs the same reader (service/gate/control.py adds its claim and its
writes), so both agree on what the log says.

A broker outage leaves the book as it was (serving goes on with the last
decision read); the thread reads the topic again from its start once the
broker is back, and again when the topic was recreated (a memory-only broker
restarted: the gate then publishes its state again).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from core import signing
from core.bus import COMPACT, ensure_topics, new_consumer, topic_id_of
from service.registry.book import VersionBook
from service.registry.control_log import ControlLog, Taken

log = logging.getLogger("service.registry")


class RegistryFollower:
    def __init__(self, book: VersionBook, bootstrap: str, topic: str, client: str,
                 on_applied: Callable[[dict[str, Any]], None] | None = None, scores=None,
                 remembered: dict[str, Any] | None = None):
        self.book, self.bootstrap, self.topic, self.client = book, bootstrap, topic, client
        self.on_applied = on_applied
        self.shared = ControlLog(topic, book, scores, remembered or {}, self._after_change)  # the topic, as read here
        self._lock = self.shared.lock
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"odpo-{client}-registry", daemon=True)
        self._consumer: KafkaConsumer | None = None
        self._tp = TopicPartition(self.topic, 0)
        self.has_read = False  # the topic was read to its end once: the book holds the gate's decisions

    @property
    def applied_seq(self) -> int:
        """The seq of the gate's state the book holds (this reading pass)."""
        return self.shared.applied_seq

    @property
    def caught_up(self) -> bool:
        return self.shared.caught_up

    def view(self) -> dict[str, Any]:
        with self._lock:
            shared = self.shared
            return {"writer": shared.leader_id, "epoch": shared.epoch, "seq": shared.applied_seq,
                    "caught_up": shared.caught_up, "read": self.has_read}

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Wait until the book holds the gate's state of sequence number `seq` or newer."""
        return self.shared.wait_applied(seq, timeout_s)

    # -- life ----------------------------------------------------------------------------------------
    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=5)  # a daemon thread: one stuck reaching a down broker (30 s) ends with the process
        if self._consumer is not None:
            with contextlib.suppress(Exception):  # shutting down: a broken connection is gone either way
                self._consumer.close()

    def _run(self) -> None:
        next_check = 0.0
        while not self._halt.is_set():
            try:
                if self._consumer is None:
                    self._connect()
                    next_check = time.monotonic() + 5
                self._read(self._consumer.poll(timeout_ms=200))
                self._act()
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 5
                    self._check_topic()
            except Exception as exc:  # noqa: BLE001 - kafka-python raises several kinds; start a new pass
                log.warning("registry: %s: %s; reading %s again in 5 s", type(exc).__name__, exc, self.topic)
                self._disconnect()
                self._halt.wait(5)

    def _connect(self) -> None:
        ensure_topics(self.bootstrap, [self.topic], partitions=1, configs=COMPACT)  # one partition: see above
        self._connected()
        consumer = new_consumer(self.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", client_id=f"odpo-{self.client}-registry",
                                max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20,
                                fetch_max_wait_ms=100,  # a change of the gate reaches the readers within ~0.1 s
                                request_timeout_ms=15_000)  # end_offsets on a down broker: not kafka's 5 min
        consumer.assign([self._tp])
        consumer.seek_to_beginning(self._tp)
        with self._lock:  # a new reading pass from the topic's start; the book stays
            self.shared.reset()
            self.shared.end = consumer.end_offsets([self._tp])[self._tp]
        self._consumer = consumer
        self.shared.topic_id = topic_id_of(consumer, self.topic)
        log.info("registry: reading %s (%d messages) as %s", self.topic, self.shared.end, self.client)

    def _disconnect(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):  # a broken connection is gone either way
                consumer.close()

    def _check_topic(self) -> None:
        """A recreated topic (a memory-only broker restarted) is read from its start again."""
        if self.shared.recreated(self._consumer.end_offsets([self._tp])[self._tp],
                                 topic_id_of(self._consumer, self.topic)):
            log.warning("registry: %s was recreated (a broker restart?); reading it again", self.topic)
            self._disconnect()

    # -- reading -------------------------------------------------------------------------------------
    def _read(self, batches: dict) -> None:
        """Take each message; once the topic is read to its end (past the end offset read at the start, and a
        poll brings nothing more), the book takes the gate's state."""
        for records in batches.values():
            for rec in records:
                # Signed by the gate when a message key is configured (core/signing.py): a forged head could
                # otherwise claim an epoch no real gate reaches and fence every one of them.
                refused = signing.refusal(self.topic, rec.value, rec.headers, f"{self.client}-registry", signed=True)
                if refused is not None:
                    log.error("registry: %s@%d is not signed by a listed message key (%s); skipped", self.topic,
                              rec.offset, refused)
                    continue
                try:
                    taken = self.shared.take(rec.key.decode() if rec.key else "", rec.value)
                except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
                    log.error("registry: unreadable message %s@%d (%s); skipped", self.topic, rec.offset, exc)
                    continue
                if taken is not None:
                    self._taken(taken)
        shared = self.shared
        if not shared.caught_up and not batches and self._consumer.position(self._tp) >= shared.end:
            shared.read_to_end()
        if shared.caught_up and self._applies():
            shared.apply()
        if shared.caught_up:
            self.has_read = True

    # -- what the gate's writer changes ----------------------------------------------------------------
    def _connected(self) -> None:
        """Before a new reading pass (the gate's writer connects its producer)."""

    def _taken(self, taken: Taken) -> None:
        """React to one message read (the gate's writer: its claim read back, a higher epoch)."""

    def _applies(self) -> bool:
        """Whether the book takes the log's state now (a reader: always; the gate: not while it writes)."""
        return True

    def _act(self) -> None:
        """Once per poll: a reader does nothing more."""

    def _after_change(self, head: dict[str, Any]) -> None:
        if self.on_applied is not None:
            self.on_applied(head)
