"""One control plane for the gateway replicas: the policy registry shared through Kafka, one leader that gates.

The shared state lives on the compacted, one-partition `control_topic`
(`odpo.gateway.control`): a message per version record, a `head` naming the
promoted version and the records it is made of, and the leader's `claim`;
every replica reads it from its start and keeps its book equal to the newest
accepted head, and a message of an older epoch is fenced
(service/gateway/control_log.py says how).

The leader is the replica that owns the leader partition and has read its own
claim back (so it has read everything before it). It then takes the head's
state (a version being scored by its predecessor is pending again; scores of
another held-out evaluation are dropped), republishes what the log lacks (all
of it when the topic is empty: a memory-only broker restarted, and the state
comes from the registry file or memory), and publishes every change of its
book (service/gateway/control_publish.py). Only then does the promotion gate
run on it (`leading`); when it loses the partition, or sees a higher epoch, it
stops at once and takes the shared state back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from core.bus import COMPACT, ensure_topics, topic_id_of
from service.gateway.book import VersionBook
from service.gateway.control_log import CLAIM, RECORD_PREFIX, ControlLog
from service.gateway.control_publish import NotReplicated, Publisher
from service.gateway.leader import LeaderElection
from service.gateway.metrics import LEADER, ScoreGauge, sync_promoted
from service.gateway.registry_file import RegistryFile
from core.settings import GatewaySettings

__all__ = ["ControlPlane", "NotReplicated", "advertise_url"]

log = logging.getLogger(__name__)

FOLLOWING, CLAIMING, LEADING = "following", "claiming", "leading"


def advertise_url(settings: GatewaySettings) -> str:
    if settings.advertise_url:
        return settings.advertise_url.rstrip("/")
    host = settings.host if settings.host not in ("", "0.0.0.0", "::") else socket.gethostname()
    return f"http://{host}:{settings.port}"


class ControlPlane:
    def __init__(self, book: VersionBook, settings: GatewaySettings, bootstrap: str, scores: ScoreGauge,
                 evaluation: dict[str, Any], registry: RegistryFile | None = None):
        self.book, self.settings, self.bootstrap, self.scores = book, settings, bootstrap, scores
        self.evaluation, self.registry = evaluation, registry
        self.topic = settings.control_topic
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.url = advertise_url(settings)
        remembered = registry.control if registry is not None else {}
        self.shared = ControlLog(self.topic, book, scores, remembered, self._after_change)  # the topic, as read here
        self._lock = self.shared.lock
        self.writes = Publisher(bootstrap, self.topic, book, self.shared, evaluation, registry, self.replica,
                                self.url, lambda: self.term)
        self._halt = threading.Event()
        self.election = LeaderElection(bootstrap, settings.leader_topic, f"odpo-gateway-{self.replica}",
                                       settings.leader_session_timeout_s, self._elected_changed)
        self._thread = threading.Thread(target=self._run, name="odpo-gateway-control", daemon=True)
        self._consumer: KafkaConsumer | None = None
        self._tp = TopicPartition(self.topic, 0)
        self.role = FOLLOWING
        self.epoch = 0  # epoch of this replica's claim while claiming or leading
        self._may_claim = False  # set by an election gain; cleared by a claim, or by another replica's claim
        self._paused = False  # leading, but the leader group rebalances: no gate, no changes until it ends
        self._claimed_at = 0.0

    # -- the replicated book -------------------------------------------------------------------------
    def attach(self) -> ControlPlane:
        """Publish every change of the book while leading (before the hooks that were there)."""
        chained = self.book.on_change

        def changed() -> None:
            if self.leading:
                try:
                    self.writes.publish()
                except NotReplicated:
                    pass  # retried by the control thread; an admin call sees `dirty`
            else:  # the gate of an ex-leader finishing a step: the shared state is taken again
                self.shared.diverged = True
            if chained is not None:
                chained()

        self.book.on_change = changed
        self._downstream = chained
        return self

    @property
    def leading(self) -> bool:
        """True while this replica leads: the promotion gate runs and admin changes are made here."""
        return self.role == LEADING and self.election.elected

    @property
    def term(self) -> int:
        """The epoch this replica leads in (0 when it does not lead): the gate decides a version only in the term
        it picked it in."""
        return self.epoch if self.leading else 0

    @property
    def dirty(self) -> bool:
        return self.writes.dirty

    @property
    def applied_seq(self) -> int:
        """The seq of the shared state the book holds (this reading pass)."""
        return self.shared.applied_seq

    @property
    def leader_url(self) -> str | None:
        return self.shared.leader_url

    @property
    def leader_id(self) -> str | None:
        return self.shared.leader_id

    def view(self) -> dict[str, Any]:
        with self._lock:
            shared = self.shared
            return {"replica": self.replica, "url": self.url, "leading": self.leading, "role": self.role,
                    "leader": shared.leader_id, "leader_url": shared.leader_url, "epoch": shared.epoch,
                    "seq": shared.applied_seq, "caught_up": shared.caught_up}

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Wait until this replica's book holds the shared state of sequence number `seq` or newer."""
        return self.shared.wait_applied(seq, timeout_s)

    # -- life ----------------------------------------------------------------------------------------
    def start(self) -> ControlPlane:
        self._thread.start()
        self.election.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=5)  # a daemon thread: one stuck reaching a down broker (30 s) ends with the process
        self.election.stop(timeout_s=0.5 if self._thread.is_alive() else 5)
        for close in (self._consumer and self._consumer.close, self.writes.producer and self.writes.producer.close):
            if close:
                with contextlib.suppress(Exception):  # shutting down: a broken connection is gone either way
                    close()
        LEADER.set(0)

    def _elected_changed(self, owned: bool) -> None:
        if owned:
            self._may_claim = True

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
                log.warning("control plane: %s: %s; reading %s again in 5 s", type(exc).__name__, exc, self.topic)
                self._disconnect()
                self._halt.wait(5)

    def _connect(self) -> None:
        ensure_topics(self.bootstrap, [self.topic], configs=COMPACT)
        self.writes.connect()
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                 auto_offset_reset="earliest", client_id=f"odpo-gateway-control-{self.replica}",
                                 max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20,
                                 fetch_max_wait_ms=100,  # a leader's change reaches the others within ~0.1 s
                                 request_timeout_ms=15_000)  # end_offsets on a down broker: not kafka's 5 min
        consumer.assign([self._tp])
        consumer.seek_to_beginning(self._tp)
        with self._lock:  # a new reading pass from the topic's start; the book stays
            self.shared.reset()
            self.writes.forget()
            self.shared.end = consumer.end_offsets([self._tp])[self._tp]
        self._consumer = consumer
        self.shared.topic_id = topic_id_of(consumer, self.topic)
        log.info("control plane: reading %s (%d messages) as %s", self.topic, self.shared.end, self.replica)

    def _disconnect(self) -> None:
        if self.role != FOLLOWING:
            self._step_down("the control topic is read again")
            self._may_claim = True  # still elected, maybe: claim again once the topic is read
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):  # a broken connection is gone either way
                consumer.close()

    def _check_topic(self) -> None:
        """A recreated topic (a memory-only broker restarted) is read from its start again; a leader then
        claims anew and publishes everything."""
        if self.shared.recreated(self._consumer.end_offsets([self._tp])[self._tp],
                                 topic_id_of(self._consumer, self.topic)):
            log.warning("control plane: %s was recreated (a broker restart?); reading it again", self.topic)
            self._disconnect()

    # -- reading -------------------------------------------------------------------------------------
    def _read(self, batches: dict) -> None:
        """Take each message; once the topic is read to its end (past the end offset read at the start, and a
        poll brings nothing more), the book takes the shared state."""
        for records in batches.values():
            for rec in records:
                try:
                    self._take(rec.key.decode() if rec.key else "", rec.value)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("control plane: unreadable message %s@%d (%s); skipped", self.topic, rec.offset, exc)
        shared = self.shared
        if not shared.caught_up and not batches and self._consumer.position(self._tp) >= shared.end:
            shared.read_to_end()
        if shared.caught_up and self.role == FOLLOWING:
            shared.apply()

    def _take(self, key: str, value: bytes | None) -> None:
        """Fold the message into the shared state, then act on it: our claim read back (lead), a higher epoch
        (step down), a write of another replica's while we lead (write ours again after it)."""
        taken = self.shared.take(key, value)
        if taken is None:
            return
        mine = self.role != FOLLOWING
        if taken.kind == RECORD_PREFIX:
            if self.role == LEADING:
                self.writes.saw_record(taken.version, taken.msg, self.epoch)
            return
        epoch, writer = taken.epoch, taken.writer
        ours = (writer, epoch) == (self.replica, self.epoch)
        if taken.kind == CLAIM:
            if not taken.accepted:
                if self.role == LEADING and writer != self.replica:
                    self.writes.sent_head = None  # a late claim: ours and the head again after it
                elif self.role == CLAIMING and ours:
                    self._step_down(f"epoch {epoch} was claimed first by {self.shared.owner}")
                return
            if self.role == CLAIMING and ours:
                self._lead()
            elif mine and epoch >= self.epoch:
                self._step_down(f"{writer} claimed epoch {epoch}")
                self._may_claim = False  # the group gave it to that replica: claim again only after a new gain
            return
        if not taken.accepted:
            if self.role == LEADING:  # a fenced head: publish ours again after it
                self.writes.sent_head = None
            return
        if ours and self.role == LEADING:
            self.shared.set_applied(int(taken.msg["seq"]))  # our own head: the book already holds it
        elif mine and epoch >= self.epoch:
            self._step_down(f"{writer} wrote epoch {epoch}")
            self._may_claim = False

    def _after_change(self, head: dict[str, Any]) -> None:
        """What every change of the book does besides publishing: file, holds, metrics."""
        if self.registry is not None:
            self.registry.evaluation = head.get("evaluation") or self.evaluation
            self.registry.control = {"epoch": self.shared.memory_epoch,
                                     "seq": max(self.shared.memory_seq, int(head["seq"])), "leader": head["writer"]}
        sync_promoted(self.book)
        if self._downstream is not None:
            self._downstream()

    # -- leading -------------------------------------------------------------------------------------
    def _act(self) -> None:
        """Claim after an election gain, stop when the election is lost, retry a failed publish, repair."""
        if self.role != FOLLOWING and not self.election.elected:
            if self.role == LEADING and self.election.in_rebalance(2 * self.settings.leader_session_timeout_s):
                if not self._paused:  # no one else can own the partition meanwhile; it is likely ours again
                    self._paused = True
                    log.info("control plane: the leader group rebalances; the gate pauses until it is assigned")
            else:
                self._step_down("it lost the leader partition")
        elif self.role == LEADING and self._paused:
            self._paused, self._may_claim = False, False
            log.info("control plane: %s leads on after the rebalance (epoch %d)", self.replica, self.epoch)
        if self.role == CLAIMING and time.monotonic() - self._claimed_at > 30:
            self._step_down("the claim was not read back within 30 s")
            self._may_claim = True
        if self.role == FOLLOWING and self._may_claim and self.election.elected and self.shared.caught_up:
            self._may_claim = False
            self._claim()
        if self.role == LEADING and self.writes.due:
            try:
                self.writes.publish()
            except NotReplicated:
                pass
        if self.role == FOLLOWING and self.shared.diverged and self.shared.caught_up:
            self.shared.apply()

    def _claim(self) -> None:
        epoch = max(self.shared.epoch, self.shared.memory_epoch) + 1
        try:
            self.writes.send([self.writes.claim(epoch)])
        except Exception as exc:  # noqa: BLE001 - the next poll tries again
            log.warning("control plane: could not claim epoch %d (%s)", epoch, exc)
            self._may_claim = True
            return
        self.epoch, self.role, self._claimed_at = epoch, CLAIMING, time.monotonic()
        log.info("control plane: claimed epoch %d; leading once it is read back", epoch)

    def _lead(self) -> None:
        """Our claim was read back, so the shared state before it is all read: take it and lead."""
        self.shared.apply()
        head = self.shared.head
        same_eval = head is None or head.get("evaluation") == self.evaluation
        self.book.restore_state(self.book.export_state(), keep_scores=same_eval)  # `evaluating` -> pending
        if not same_eval:
            log.warning("control plane: the shared scores come from another held-out evaluation; versions will "
                        "be scored again")
        if self.registry is not None:
            self.registry.evaluation = self.evaluation
        with self.writes.lock, self._lock:
            self.writes.lead(self.shared.in_log)
            self.role = LEADING
        LEADER.set(1)
        log.warning("control plane: %s leads (epoch %d): the promotion gate runs here; %s", self.replica, self.epoch,
                    "shared state read back" if head is not None else
                    f"{self.topic} held no state, published from this replica's registry")
        try:
            self.writes.publish()
        except NotReplicated:
            pass

    def _step_down(self, why: str) -> None:
        was = self.role
        with self._lock:
            self.role, self.shared.applied_digests, self._paused = FOLLOWING, None, False
        LEADER.set(0)
        if was == LEADING:
            log.warning("control plane: %s no longer leads (%s); the promotion gate stops here", self.replica, why)
        if self.shared.caught_up:
            self.shared.apply()  # whatever the gate changed here since is replaced by the shared state

    def published_seq(self) -> int:
        """The leader's seq after a change of its book (the change was published by `on_change`)."""
        return self.writes.published_seq()
