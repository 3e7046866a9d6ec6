"""What every gateway replica served, shared through odpo.served, so feedback works through any replica.

A replica keeps each response it serves for feedback (`keep`): in its own
`ServedStore` at once, and on odpo.served (keyed by response id) through the
outbox, so no client waits on Kafka. A thread tails the topic (an assigned
consumer, no group) into the same store, so a response one replica served can
be rated or compared through another, and through any replica after a
restart, for `served_retention_s`.

On start the tail reads back the last `served_capacity` records of each
partition (what the LRU holds), not from a time: Tansu answers a timestamp
lookup past the end with offset 0. Records older than the retention are
skipped (Tansu deletes nothing by age). Tansu reports a partition's end as its
last batch's first offset + 1, a lower bound, so "read to the end" is a
position at or past it with the fetched records drained.

/v1/feedback for an id not kept here awaits `caught_up`: the tail reads the
topic to an end taken at least `SETTLE_S` after the ask (the serving replica
publishes in the background, a few ms), bounded by the caller's timeout; so a
rating sent to one replica right after another served (or right after this
one started) is no 404 by a race. While the broker is away (the tail's last
try failed) nothing waits: unknown ids are 404 at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque

import anyio
from kafka import KafkaConsumer, TopicPartition

from core import signing
from core.broker import kafka_ready
from core.bus import ensure_topics, new_consumer, retention, topic_id_of
from core.contracts import TOPIC_SERVED, ServedRecord, ServedText
from core.topics import topic_name
from service.gateway.outbox import Outbox
from service.gateway.served import ServedChoice, ServedStore

log = logging.getLogger(__name__)

SETTLE_S = 0.2  # the end a waiting /v1/feedback is answered by is read at least this long after it asked
CHECK_S = 5.0  # how often the tail looks for a recreated topic (a memory-only broker restarted)


class ServedLog:
    """This replica's side of odpo.served: publishes what it keeps, and reads every replica's into its store."""

    def __init__(self, bootstrap: str, store: ServedStore, outbox: Outbox, retention_s: float,
                 topic: str | None = None):
        self.bootstrap, self.topic, self.retention_s = bootstrap, topic or topic_name(TOPIC_SERVED), retention_s
        self.store, self.outbox = store, outbox
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.away = False  # the tail's last try to read the topic failed: `caught_up` asks are not waited for
        self._consumer: KafkaConsumer | None = None
        self._ends: dict[TopicPartition, int] = {}
        self._topic_id = None
        self._lock = threading.Lock()
        self._asked = 0
        self._answered = 0
        self._pending: deque[tuple[int, float]] = deque()  # (ticket, when asked) not answered yet
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="odpo-gateway-served", daemon=True)

    def start(self) -> ServedLog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self.away = True  # nothing waits on a tail that stops
        self._thread.join(timeout=5)  # a daemon thread: one stuck reaching a down broker ends with the process
        self._disconnect()

    # -- for request handlers ------------------------------------------------------------------------
    def keep(self, response_id: str, choices: list[ServedChoice]) -> None:
        """Keep a served response for feedback here, and publish it for every replica without waiting."""
        if not response_id or not choices:
            return
        self.store.put(response_id, choices)
        texts = [ServedText(prompt=c.prompt, text=c.text, policy_version=c.policy_version) for c in choices]
        self.outbox.served(ServedRecord(id=response_id, choices=texts, replica=self.replica))

    async def caught_up(self, timeout_s: float) -> bool:
        """Wait until the tail has read what the topic holds now; False when not within `timeout_s`, or at once
        while the broker is away."""
        if self.away:
            return False
        with self._lock:
            self._asked += 1
            ticket = self._asked
            self._pending.append((ticket, time.monotonic()))
        deadline = time.monotonic() + timeout_s
        while self._answered < ticket:
            if self.away or time.monotonic() >= deadline:
                return False
            await anyio.sleep(0.01)
        return True

    # -- the tail ------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_check = 0.0
        while not self._halt.is_set():
            try:
                if self._consumer is None:
                    self._connect()
                    next_check = time.monotonic() + CHECK_S
                now = time.monotonic()
                with self._lock:
                    due = bool(self._pending) and self._pending[0][1] + SETTLE_S <= now
                if due:
                    self._catch_up(now)
                elif now >= next_check:
                    next_check = now + CHECK_S
                    self._check_ends()
                else:
                    self._take(self._consumer.poll(timeout_ms=100))
            except Exception as exc:  # noqa: BLE001 - kafka-python raises several kinds; connect again
                log.warning("served log: %s: %s; reading %s again in 2 s", type(exc).__name__, exc, self.topic)
                self.away = True
                self._disconnect()
                self._halt.wait(2)

    def _connect(self) -> None:
        if not kafka_ready(self.bootstrap, 2.0):  # ensure_topics takes 30 s to say so
            raise ConnectionError(f"the broker at {self.bootstrap} does not answer")
        ensure_topics(self.bootstrap, [self.topic], configs=retention(self.retention_s))
        consumer = new_consumer(self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                client_id=f"odpo-gateway-served-{self.replica}", fetch_max_wait_ms=100,
                                request_timeout_ms=15_000)
        self._consumer = consumer
        tps = [TopicPartition(self.topic, p) for p in sorted(consumer.partitions_for_topic(self.topic) or {0})]
        consumer.assign(tps)
        begin, self._ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        for tp in tps:  # what the LRU can hold; read back again after every reconnect (a put is idempotent)
            consumer.seek(tp, max(begin[tp], self._ends[tp] - self.store.capacity))
        self._topic_id = topic_id_of(consumer, self.topic)
        self.away = False
        log.info("served log: reading %s from %s as %s", self.topic, {tp.partition: consumer.position(tp)
                                                                      for tp in tps}, self.replica)

    def _disconnect(self) -> None:
        with self._lock:
            self._pending.clear()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):  # a broken connection is gone either way
                consumer.close()

    def _check_ends(self) -> dict[TopicPartition, int]:
        """The partitions' ends now; a recreated topic (new id, or an end that went back) is read from its start."""
        ends = self._consumer.end_offsets(list(self._ends))
        topic_id = topic_id_of(self._consumer, self.topic)
        if any(ends[tp] < self._ends[tp] for tp in ends) or (topic_id and self._topic_id and
                                                             topic_id != self._topic_id):
            log.warning("served log: %s was recreated (a broker restart?); reading it from its start", self.topic)
            self._consumer.seek_to_beginning(*ends)
            self._topic_id = topic_id
        self._ends = ends
        return ends

    def _catch_up(self, started: float) -> None:
        """Read to the ends as they are now, then answer every ask made `SETTLE_S` or more before `started`."""
        ends, deadline = self._check_ends(), time.monotonic() + CHECK_S
        while not self._halt.is_set() and any(self._consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:  # the broker went away meanwhile
                raise TimeoutError(f"{self.topic} not read to its end within {CHECK_S:.0f} s")
            self._take(self._consumer.poll(timeout_ms=100))
        self._take(self._consumer.poll(timeout_ms=0))  # the rest of the last batch, if a poll left some
        with self._lock:
            while self._pending and self._pending[0][1] + SETTLE_S <= started:
                self._answered = self._pending.popleft()[0]

    def _take(self, batches: dict) -> None:
        oldest = time.time() - self.retention_s
        for records in batches.values():
            for rec in records:
                why = signing.refusal(self.topic, rec.value, rec.headers, "gateway")
                if why is not None:  # a forger's text would reach training through feedback: never taken
                    log.warning("served log: record %s@%d skipped (signature: %s)", self.topic, rec.offset, why)
                    continue
                try:
                    served = ServedRecord.from_bytes(rec.value)
                except ValueError as exc:  # pydantic's ValidationError too: another writer's junk is skipped
                    log.warning("served log: unreadable record %s@%d skipped (%s)", self.topic, rec.offset, exc)
                    continue
                if served.replica == self.replica or served.served_at < oldest:
                    continue  # kept here already, or past the retention
                self.store.put(served.id, [ServedChoice(c.prompt, c.text, c.policy_version) for c in served.choices])
