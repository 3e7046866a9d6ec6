"""The gate's decisions as one process reads them from the control topic, and its book kept equal to them.

The registry lives on the compacted, one-partition `control_topic`
(`odpo.control`), one message per key so that compaction keeps the whole
state and no message gets big:

- `version-<N>`: that version's `VersionRecord` (evaluation rows included)
  and its digest; a tombstone when the book forgot the version;
- `head`: promoted version, history, pin, the held-out evaluation the scores
  belong to, the digest of every record it is made of, a sequence number
  `seq`, and the writer's `epoch`, id and URL;
- `claim`: a gate that starts claims epoch = (highest it has seen) + 1.

Every reader (each gateway replica, and the gate itself) reads the topic
from its start (no group) and, once it has read to the end, makes its book the state of the newest accepted head (the records
it names by digest, all at once). Acceptance is decided by the log alone, so
every process reading it takes the same state: a claim is accepted if its
epoch is higher than every epoch before it; a head if its epoch is higher, or
equal, from the same writer and with a higher `seq` (an older head written
again, a replay, is ignored). An older epoch's message (a second gate
started by mistake, or a paused one that woke up) is ignored, and the gate of
the newest epoch writes the key again after it, so compaction cannot leave it
last.

`ControlLog` is one reading pass of the topic (no thread, no Kafka client):
service/registry/follower.py polls the topic, hands it each message and
reacts to what `take` says the message was (the gate: its own claim read
back, a higher epoch, a fenced write).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from core.contracts import version_name
from service.registry.book import VersionBook
from service.registry.metrics import CONTROL_EPOCH, CONTROL_SEQ

log = logging.getLogger("service.registry")

SCHEMA = 1
HEAD, CLAIM, RECORD_PREFIX = "head", "claim", "version-"
RECORDS_KEPT = 2  # digests kept per version: the newest and the one before (a fenced write may follow a head)


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _epoch(value: Any) -> int:
    """An epoch as the gate writes it: a JSON integer in [0, 2^63). (`1e999` is a float, infinite: int() of it
    raises OverflowError; `1e30` would fence every real gate for good.)"""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise ValueError(f"epoch {value!r} is not an integer in [0, 2^63)")
    return value


def _check_head(msg: dict[str, Any]) -> None:
    """The fields of a head that the reader uses, each of its type (a head that passed here cannot fail later,
    in `apply` or the log line after the first pass, and make the reader read the topic again and again)."""
    if not isinstance(msg.get("versions"), dict) or not all(
            isinstance(d, str) and str(v).isdigit() for v, d in msg["versions"].items()):
        raise ValueError("a head's `versions` must map version numbers to digests")
    for field in ("seq", "promoted"):
        if isinstance(msg.get(field), bool) or not isinstance(msg.get(field), int) or msg[field] < 0:
            raise ValueError(f"a head's `{field}` must be a non-negative integer")


class Taken(NamedTuple):
    """What one message of the topic was: `kind` is RECORD_PREFIX (a version's record, `msg` None for a
    tombstone), CLAIM or HEAD (with its `epoch` and `writer`, and whether the log `accepted` it)."""

    kind: str
    version: int | None = None
    msg: dict[str, Any] | None = None
    epoch: int = 0
    writer: str = ""
    accepted: bool = False


class ControlLog:
    """What this process read of the control topic in the current pass, and the book made the newest accepted
    head's state. `lock` guards what other threads read (the view, `wait_applied`)."""

    def __init__(self, topic: str, book: VersionBook, scores, remembered: dict[str, Any],
                 changed: Callable[[dict[str, Any]], None]):
        self.topic, self.book, self.scores, self.changed = topic, book, scores, changed
        self.memory_epoch = int(remembered.get("epoch", 0))  # highest epoch this process ever saw (claims)
        self.memory_seq = int(remembered.get("seq", 0))
        self.lock = threading.RLock()
        self.applied = threading.Condition(self.lock)
        self.diverged = False  # the book changed here while not writing: take the log's state again
        self.reset()

    def reset(self) -> None:
        """Forget what was read from the topic (a new reading pass from its start); the book stays."""
        self.store: dict[int, dict[str, bytes]] = {}  # version -> digest -> record JSON
        self.in_log: dict[int, str | None] = {}  # version -> digest of its newest message (None: tombstone)
        self.head: dict[str, Any] | None = None  # newest accepted head
        self.epoch = 0  # highest accepted epoch in this pass
        self.owner: str | None = None
        self.leader_url: str | None = None
        self.leader_id: str | None = None
        self.applied_seq = 0  # seq of the head the book holds (this pass)
        self.applied_digests: dict[int, str] | None = None  # None: apply in full next time
        self.caught_up = False
        self.end = 0
        self.topic_id = None
        self.seq = 0  # highest seq seen in this pass

    # -- the topic -----------------------------------------------------------------------------------
    def recreated(self, end: int, topic_id) -> bool:
        """True when the topic has a new id, or its end went back: it was recreated (a memory-only broker
        restarted). (Tansu answers the last batch's base offset + 1 as the end, a lower bound, so the end is
        compared with earlier ends, not with the position.)"""
        if end < self.end or (topic_id and self.topic_id and topic_id != self.topic_id):
            return True
        self.end, self.topic_id = end, self.topic_id or topic_id
        return False

    def read_to_end(self) -> None:
        """The topic is read to its end (past the end offset read at the start, and a poll brought nothing
        more): from now on the book takes the shared state."""
        with self.lock:
            self.caught_up = True
        log.info("registry: read %s to its end: %s", self.topic,
                 "no shared state yet" if self.head is None else
                 f"{version_name(self.head['promoted'])} promoted (seq {self.head['seq']}, gate "
                 f"{self.head['writer']})")

    def take(self, key: str, value: bytes | None) -> Taken | None:
        """Fold one message into the pass (None: a message of no kind this log knows, or a tombstone of one)."""
        if key.startswith(RECORD_PREFIX):
            version = int(key[len(RECORD_PREFIX):])
            if value is None:
                self.in_log[version] = None
                return Taken(RECORD_PREFIX, version)
            msg = json.loads(value)
            digest = msg["digest"]
            kept = self.store.setdefault(version, {})
            kept.pop(digest, None)
            kept[digest] = canonical(msg["record"])
            while len(kept) > RECORDS_KEPT:
                kept.pop(next(iter(kept)))
            self.in_log[version] = digest
            return Taken(RECORD_PREFIX, version, msg)
        if key not in (HEAD, CLAIM) or value is None:
            return None
        msg = json.loads(value)
        epoch, writer = _epoch(msg["epoch"]), str(msg["writer"])
        if key == HEAD:
            _check_head(msg)
        newer = epoch > self.epoch
        if key == CLAIM:
            if newer:
                self.accept(epoch, writer, msg.get("url", ""))
            return Taken(CLAIM, None, msg, epoch, writer, newer)
        # Within an epoch the writer's seq only rises: an older head of the same writer is a replay (a copy of
        # a real, signed record written again), never a change; the gate writes its head again after it.
        later = self.head is None or int(msg["seq"]) > int(self.head["seq"])
        if not (newer or (epoch == self.epoch and writer == self.owner and later)):
            return Taken(HEAD, None, msg, epoch, writer, False)
        self.accept(epoch, writer, msg.get("url", ""))
        with self.lock:
            self.head = msg
            self.seq = max(self.seq, int(msg["seq"]))
        return Taken(HEAD, None, msg, epoch, writer, True)

    def accept(self, epoch: int, writer: str, url: str) -> None:
        with self.lock:
            self.epoch, self.owner = epoch, writer
            self.leader_id, self.leader_url = writer, url
            self.memory_epoch = max(self.memory_epoch, epoch)
        CONTROL_EPOCH.set(epoch)

    # -- the book ------------------------------------------------------------------------------------
    def apply(self) -> None:
        """Make the book the newest accepted head's state (the records that changed), if all are here."""
        head = self.head
        if head is None:
            return
        if self.diverged:
            self.diverged, self.applied_digests = False, None
        wanted = {int(v): d for v, d in head["versions"].items()}
        if self.applied_digests == wanted and self.applied_seq >= int(head["seq"]):
            return
        missing = [v for v, d in wanted.items() if d not in self.store.get(v, {})]
        if missing:  # its records come after it in a compacted log (written again by the gate)
            return
        full = self.applied_digests is None
        have = self.applied_digests or {}
        changed = [v for v, d in wanted.items() if full or have.get(v) != d]
        try:
            records = [json.loads(self.store[v][wanted[v]]) for v in changed]
            self.book.apply_replicated(records, [v for v in have if v not in wanted], head, full=full)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a head this book cannot hold: skipped
            log.error("registry: cannot apply the shared state of seq %s (%s); keeping the state held",
                      head.get("seq"), exc)
            self.head = None
            return
        self.applied_digests = wanted
        for rec in records if self.scores is not None else ():
            if rec.get("score") is not None:
                self.scores.set(rec["version"], rec["score"], rec.get("signals"))
        self.changed(head)
        self.set_applied(int(head["seq"]))

    def set_applied(self, seq: int) -> None:
        with self.applied:
            self.applied_seq = max(self.applied_seq, seq)
            self.memory_seq = max(self.memory_seq, seq)
            self.applied.notify_all()
        CONTROL_SEQ.set(self.applied_seq)

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Wait until the book holds the shared state of sequence number `seq` or newer."""
        deadline = time.monotonic() + timeout_s
        with self.applied:
            while self.applied_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.applied.wait(left)
            return True
