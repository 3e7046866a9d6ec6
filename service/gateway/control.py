"""One control plane for the gateway replicas: the policy registry shared through Kafka, one leader that gates.

The shared state lives on the compacted, one-partition `control_topic`
(`odpo.gateway.control`), one message per key so that compaction keeps the
whole state and no message gets big:

- `version-<N>`: that version's `VersionRecord` (evaluation rows included)
  and its digest; a tombstone when the book forgot the version;
- `head`: promoted version, history, pin, the held-out evaluation the scores
  belong to, the digest of every record it is made of, a sequence number
  `seq`, and the writer's `epoch`, id and URL;
- `claim`: a replica that the leader election (leader.py) made the owner
  claims epoch = (highest it has seen) + 1, with its URL.

Every replica reads the topic from its start (no group) and, once it has read
to the end, makes its book the state of the newest accepted head (the records
it names by digest, all at once). Acceptance is decided by the log alone, so
every replica reading it takes the same state: a claim is accepted if its
epoch is higher than every epoch before it; a head if its epoch is higher, or
equal and from the same writer. An older epoch's message (a paused ex-leader
that woke up) is ignored, and the leader writes the key again after it, so
compaction cannot leave it last.

The leader is the replica that owns the leader partition and has read its own
claim back (so it has read everything before it). It then takes the head's
state (a version being scored by its predecessor is pending again; scores of
another held-out evaluation are dropped), republishes what the log lacks (all
of it when the topic is empty: a memory-only broker restarted, and the state
comes from the registry file or memory), and publishes every change of its
book: the changed records, then the head. Only then does the promotion gate
run on it (`leading`); when it loses the partition, or sees a higher epoch, it
stops at once and takes the shared state back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from service.bus import COMPACT, ensure_topics, make_producer
from service.contracts import version_name
from service.gateway.book import VersionBook
from service.gateway.leader import LeaderElection
from service.gateway.metrics import (
    CONTROL_EPOCH,
    CONTROL_SEQ,
    LEADER,
    ScoreGauge,
    sync_promoted,
)
from service.gateway.registry_file import RegistryFile
from service.settings import GatewaySettings

log = logging.getLogger(__name__)

SCHEMA = 1
HEAD, CLAIM, RECORD_PREFIX = "head", "claim", "version-"
FOLLOWING, CLAIMING, LEADING = "following", "claiming", "leading"
RECORDS_KEPT = 2  # digests kept per version: the newest and the one before (a fenced write may follow a head)


class NotReplicated(Exception):
    """The leader changed its book but could not publish it (the broker is unreachable); it retries."""


def advertise_url(settings: GatewaySettings) -> str:
    if settings.advertise_url:
        return settings.advertise_url.rstrip("/")
    host = settings.host if settings.host not in ("", "0.0.0.0", "::") else socket.gethostname()
    return f"http://{host}:{settings.port}"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class ControlPlane:
    def __init__(self, book: VersionBook, settings: GatewaySettings, bootstrap: str, scores: ScoreGauge,
                 evaluation: dict[str, Any], registry: RegistryFile | None = None,
                 after_apply: Callable[[], None] | None = None):
        self.book, self.settings, self.bootstrap, self.scores = book, settings, bootstrap, scores
        self.evaluation, self.registry, self.after_apply = evaluation, registry, after_apply
        self.topic = settings.control_topic
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.url = advertise_url(settings)
        remembered = registry.control if registry is not None else {}
        self._memory_epoch = int(remembered.get("epoch", 0))  # highest epoch this replica ever saw (claims)
        self._memory_seq = int(remembered.get("seq", 0))
        self._lock = threading.RLock()
        self._applied = threading.Condition(self._lock)
        self._publish_lock = threading.Lock()
        self._halt = threading.Event()
        self.election = LeaderElection(bootstrap, settings.leader_topic, f"odpo-gateway-{self.replica}",
                                       settings.leader_session_timeout_s, self._elected_changed)
        self._thread = threading.Thread(target=self._run, name="odpo-gateway-control", daemon=True)
        self._producer = None
        self._consumer: KafkaConsumer | None = None
        self._topic_id = None
        self._tp = TopicPartition(self.topic, 0)
        self.role = FOLLOWING
        self.epoch = 0  # epoch of this replica's claim while claiming or leading
        self._may_claim = False  # set by an election gain; cleared by a claim, or by another replica's claim
        self._paused = False  # leading, but the leader group rebalances: no gate, no changes until it ends
        self._claimed_at = 0.0
        self._foreign: set[int] = set()  # versions another writer wrote while we lead: written again
        self._diverged = False  # the book changed here while not leading: take the shared state again
        self._dirty = False  # the leader's last publish failed
        self._reset_log()

    def _reset_log(self) -> None:
        """Forget what was read from the topic (a new reading pass from its start); the book stays."""
        self._store: dict[int, dict[str, bytes]] = {}  # version -> digest -> record JSON
        self._in_log: dict[int, str | None] = {}  # version -> digest of its newest message (None: tombstone)
        self._head: dict[str, Any] | None = None  # newest accepted head
        self._log_epoch = 0  # highest accepted epoch in this pass
        self._owner: str | None = None
        self.leader_url: str | None = None
        self.leader_id: str | None = None
        self.applied_seq = 0  # seq of the head the book holds (this pass)
        self._applied_digests: dict[int, str] | None = None  # None: apply in full next time
        self._caught_up = False
        self._end = 0
        self._sent: dict[int, str | None] = {}  # the leader's view of the newest message per key
        self._sent_head: bytes | None = None
        self._seq = 0  # highest seq seen in this pass

    # -- the replicated book -------------------------------------------------------------------------
    def attach(self) -> ControlPlane:
        """Publish every change of the book while leading (before the hooks that were there)."""
        chained = self.book.on_change

        def changed() -> None:
            if self.leading:
                try:
                    self._publish()
                except NotReplicated:
                    pass  # retried by the control thread; an admin call sees `dirty`
            else:  # the gate of an ex-leader finishing a step: the shared state is taken again
                self._diverged = True
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
        return self._dirty

    def view(self) -> dict[str, Any]:
        with self._lock:
            return {"replica": self.replica, "url": self.url, "leading": self.leading, "role": self.role,
                    "leader": self.leader_id, "leader_url": self.leader_url, "epoch": self._log_epoch,
                    "seq": self.applied_seq, "caught_up": self._caught_up}

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Wait until this replica's book holds the shared state of sequence number `seq` or newer."""
        deadline = time.monotonic() + timeout_s
        with self._applied:
            while self.applied_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._applied.wait(left)
            return True

    # -- life ----------------------------------------------------------------------------------------
    def start(self) -> ControlPlane:
        self._thread.start()
        self.election.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=5)  # a daemon thread: one stuck reaching a down broker (30 s) ends with the process
        self.election.stop(timeout_s=0.5 if self._thread.is_alive() else 5)
        for close in (self._consumer and self._consumer.close, self._producer and self._producer.close):
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
        if self._producer is None:
            self._producer = make_producer(self.bootstrap)
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                 auto_offset_reset="earliest", client_id=f"odpo-gateway-control-{self.replica}",
                                 max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20,
                                 fetch_max_wait_ms=100,  # a leader's change reaches the others within ~0.1 s
                                 request_timeout_ms=15_000)  # end_offsets on a down broker: not kafka's 5 min
        consumer.assign([self._tp])
        consumer.seek_to_beginning(self._tp)
        with self._lock:
            self._reset_log()
            self._end = consumer.end_offsets([self._tp])[self._tp]
        self._consumer = consumer
        self._topic_id = self._current_topic_id()
        log.info("control plane: reading %s (%d messages) as %s", self.topic, self._end, self.replica)

    def _disconnect(self) -> None:
        if self.role != FOLLOWING:
            self._step_down("the control topic is read again")
            self._may_claim = True  # still elected, maybe: claim again once the topic is read
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):  # a broken connection is gone either way
                consumer.close()

    def _check_topic(self) -> None:
        """A topic with a new id, or whose end went back, was recreated (a memory-only broker restarted): read it
        from its start again; a leader then claims anew and publishes everything. (Tansu answers the last
        batch's base offset + 1 as the end, a lower bound, so the end is compared with earlier ends, not with
        the position.)"""
        end = self._consumer.end_offsets([self._tp])[self._tp]
        topic_id = self._current_topic_id()
        if end < self._end or (topic_id and self._topic_id and topic_id != self._topic_id):
            log.warning("control plane: %s was recreated (a broker restart?); reading it again", self.topic)
            self._disconnect()
            return
        self._end, self._topic_id = end, self._topic_id or topic_id

    def _current_topic_id(self):
        try:
            return self._consumer._client.cluster.topic_id(self.topic)
        except AttributeError:
            return None

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
        if not self._caught_up and not batches and self._consumer.position(self._tp) >= self._end:
            with self._lock:
                self._caught_up = True
            log.info("control plane: read %s to its end: %s", self.topic,
                     "no shared state yet" if self._head is None else
                     f"{version_name(self._head['promoted'])} promoted (seq {self._head['seq']}, leader "
                     f"{self._head['writer']})")
        if self._caught_up and self.role == FOLLOWING:
            self._apply()

    def _take(self, key: str, value: bytes | None) -> None:
        mine = self.role != FOLLOWING
        if key.startswith(RECORD_PREFIX):
            version = int(key[len(RECORD_PREFIX):])
            if value is None:
                self._in_log[version] = None
            else:
                msg = json.loads(value)
                digest = msg["digest"]
                kept = self._store.setdefault(version, {})
                kept.pop(digest, None)
                kept[digest] = _canonical(msg["record"])
                while len(kept) > RECORDS_KEPT:
                    kept.pop(next(iter(kept)))
                self._in_log[version] = digest
            foreign = (self._sent.get(version) is not None if value is None else
                       (msg.get("writer"), msg.get("epoch")) != (self.replica, self.epoch))
            if self.role == LEADING and foreign:
                self._foreign.add(version)  # not ours (a fenced ex-leader): written again after it
            return
        if key not in (HEAD, CLAIM) or value is None:
            return
        msg = json.loads(value)
        epoch, writer = int(msg["epoch"]), msg["writer"]
        newer = epoch > self._log_epoch
        if key == CLAIM:
            if not newer:
                if self.role == LEADING and writer != self.replica:
                    self._sent_head = None  # a late claim: ours and the head again after it
                elif self.role == CLAIMING and (writer, epoch) == (self.replica, self.epoch):
                    self._step_down(f"epoch {epoch} was claimed first by {self._owner}")
                return
            self._accept(epoch, writer, msg["url"])
            if self.role == CLAIMING and (writer, epoch) == (self.replica, self.epoch):
                self._lead()
            elif mine and epoch >= self.epoch:
                self._step_down(f"{writer} claimed epoch {epoch}")
                self._may_claim = False  # the group gave it to that replica: claim again only after a new gain
            return
        if not (newer or (epoch == self._log_epoch and writer == self._owner)):
            if self.role == LEADING:  # a fenced head: publish ours again after it
                self._sent_head = None
            return
        self._accept(epoch, writer, msg["url"])
        with self._lock:
            self._head = msg
            self._seq = max(self._seq, int(msg["seq"]))
        if (writer, epoch) == (self.replica, self.epoch) and self.role == LEADING:
            self._set_applied(int(msg["seq"]))  # our own head: the book already holds it
        elif mine and epoch >= self.epoch:
            self._step_down(f"{writer} wrote epoch {epoch}")
            self._may_claim = False

    def _accept(self, epoch: int, writer: str, url: str) -> None:
        with self._lock:
            self._log_epoch, self._owner = epoch, writer
            self.leader_id, self.leader_url = writer, url
            self._memory_epoch = max(self._memory_epoch, epoch)
        CONTROL_EPOCH.set(epoch)

    def _apply(self) -> None:
        """Make the book the newest accepted head's state (the records that changed), if all are here."""
        head = self._head
        if head is None:
            return
        if self._diverged:
            self._diverged, self._applied_digests = False, None
        wanted = {int(v): d for v, d in head["versions"].items()}
        if self._applied_digests == wanted and self.applied_seq >= int(head["seq"]):
            return
        missing = [v for v, d in wanted.items() if d not in self._store.get(v, {})]
        if missing:  # its records come after it in a compacted log (written again by the leader)
            return
        full = self._applied_digests is None
        have = self._applied_digests or {}
        changed = [v for v, d in wanted.items() if full or have.get(v) != d]
        try:
            records = [json.loads(self._store[v][wanted[v]]) for v in changed]
            self.book.apply_replicated(records, [v for v in have if v not in wanted], head, full=full)
        except (ValueError, TypeError, KeyError) as exc:  # a head this book cannot hold: skipped, said once
            log.error("control plane: cannot apply the shared state of seq %s (%s); keeping this replica's",
                      head.get("seq"), exc)
            self._head = None
            return
        self._applied_digests = wanted
        for rec in records:
            if rec.get("score") is not None:
                self.scores.set(rec["version"], rec["score"], rec.get("signals"))
        self._after_change(head)
        self._set_applied(int(head["seq"]))

    def _set_applied(self, seq: int) -> None:
        with self._applied:
            self.applied_seq = max(self.applied_seq, seq)
            self._memory_seq = max(self._memory_seq, seq)
            self._applied.notify_all()
        CONTROL_SEQ.set(self.applied_seq)

    def _after_change(self, head: dict[str, Any]) -> None:
        """What every change of the book does besides publishing: file, holds, metrics."""
        if self.registry is not None:
            self.registry.evaluation = head.get("evaluation") or self.evaluation
            self.registry.control = {"epoch": self._memory_epoch, "seq": max(self._memory_seq, int(head["seq"])),
                                     "leader": head["writer"]}
        sync_promoted(self.book)
        if self._downstream is not None:
            self._downstream()
        if self.after_apply is not None:
            self.after_apply()

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
        if self.role == FOLLOWING and self._may_claim and self.election.elected and self._caught_up:
            self._may_claim = False
            self._claim()
        if self.role == LEADING and (self._dirty or self._sent_head is None or self._foreign):
            try:
                self._publish()
            except NotReplicated:
                pass
        if self.role == FOLLOWING and self._diverged and self._caught_up:
            self._apply()

    def _claim(self) -> None:
        epoch = max(self._log_epoch, self._memory_epoch) + 1
        msg = {"schema_version": SCHEMA, "epoch": epoch, "writer": self.replica, "url": self.url, "at": time.time()}
        try:
            self._send([(CLAIM, _canonical(msg))])
        except Exception as exc:  # noqa: BLE001 - the next poll tries again
            log.warning("control plane: could not claim epoch %d (%s)", epoch, exc)
            self._may_claim = True
            return
        self.epoch, self.role, self._claimed_at = epoch, CLAIMING, time.monotonic()
        log.info("control plane: claimed epoch %d; leading once it is read back", epoch)

    def _lead(self) -> None:
        """Our claim was read back, so the shared state before it is all read: take it and lead."""
        self._apply()
        head = self._head
        same_eval = head is None or head.get("evaluation") == self.evaluation
        self.book.restore_state(self.book.export_state(), keep_scores=same_eval)  # `evaluating` -> pending
        if not same_eval:
            log.warning("control plane: the shared scores come from another held-out evaluation; versions will "
                        "be scored again")
        if self.registry is not None:
            self.registry.evaluation = self.evaluation
        with self._publish_lock, self._lock:
            self._sent = dict(self._in_log)
            self._sent_head = None
            self._foreign.clear()
            self.role = LEADING
        LEADER.set(1)
        log.warning("control plane: %s leads (epoch %d): the promotion gate runs here; %s", self.replica, self.epoch,
                    "shared state read back" if head is not None else
                    f"{self.topic} held no state, published from this replica's registry")
        try:
            self._publish()
        except NotReplicated:
            pass

    def _step_down(self, why: str) -> None:
        was = self.role
        with self._lock:
            self.role, self._applied_digests, self._paused = FOLLOWING, None, False
        LEADER.set(0)
        if was == LEADING:
            log.warning("control plane: %s no longer leads (%s); the promotion gate stops here", self.replica, why)
        if self._caught_up:
            self._apply()  # whatever the gate changed here since is replaced by the shared state

    def _publish(self) -> int:
        """Publish the records that changed since the log last had them, then the head; returns its seq."""
        with self._publish_lock:
            if not self.leading:
                raise NotReplicated("not leading")
            while self._foreign:
                self._sent[self._foreign.pop()] = "foreign"  # matches no digest: written again (or deleted)
            state = self.book.export_state()
            sends: list[tuple[str, bytes | None]] = []
            versions: dict[str, str] = {}
            for raw in state["records"]:
                body = _canonical(raw)
                digest = hashlib.sha256(body).hexdigest()[:20]
                versions[str(raw["version"])] = digest
                if self._sent.get(raw["version"]) != digest:
                    sends.append((f"{RECORD_PREFIX}{raw['version']}", _canonical(
                        {"schema_version": SCHEMA, "epoch": self.epoch, "writer": self.replica, "digest": digest,
                         "record": raw})))
            current = {int(v) for v in versions}
            sends += [(f"{RECORD_PREFIX}{v}", None) for v, d in self._sent.items() if v not in current and d]
            head = {"promoted": state["promoted"], "history": state["history"], "pinned": state["pinned"],
                    "evaluation": self.evaluation, "versions": versions}
            body = _canonical(head)
            if not sends and body == self._sent_head and not self._dirty:
                return self._seq
            seq = max(self._seq, self._memory_seq) + 1
            msg = {"schema_version": SCHEMA, **head, "seq": seq, "epoch": self.epoch, "writer": self.replica,
                   "url": self.url}
            claim = [] if self._sent_head is not None else [(CLAIM, _canonical(
                {"schema_version": SCHEMA, "epoch": self.epoch, "writer": self.replica, "url": self.url,
                 "at": time.time()}))]  # first head of this epoch, or after a fenced claim: our claim again
            try:
                self._send([*claim, *sends, (HEAD, _canonical(msg))])
            except Exception as exc:
                if not self._dirty:
                    log.error("control plane: could not publish the registry (%s: %s); retrying",
                              type(exc).__name__, exc)
                self._dirty = True
                raise NotReplicated(str(exc)) from exc
            self._dirty = False
            for key, value in sends:
                v = int(key[len(RECORD_PREFIX):])
                if value is None:
                    self._sent.pop(v, None)
                else:
                    self._sent[v] = versions[str(v)]
            self._sent_head = body
            self._seq = self._memory_seq = seq
            if self.registry is not None:
                self.registry.control = {"epoch": self.epoch, "seq": seq, "leader": self.replica}
            return seq

    def published_seq(self) -> int:
        """The leader's seq after a change of its book (the change was published by `on_change`)."""
        if not self.leading:
            raise NotReplicated("this replica no longer leads")
        if self._dirty:
            self._publish()
        return self._seq

    def _send(self, messages: list[tuple[str, bytes | None]]) -> None:
        """Send in order and wait until all are written (raises if any is not). Always to partition 0: a topic
        that a restarted broker created on first use may have several partitions, and the order must hold."""
        futures = [self._producer.send(self.topic, key=key.encode(), value=value, partition=0)
                   for key, value in messages]
        self._producer.flush(timeout=10)
        for future in futures:
            future.get(timeout=10)
