"""What the gate writes on the control topic: its claim, then every change of its book.

A change goes out as the records that changed since the log last had them (a
tombstone for a version the book forgot), then the head that names every
record by digest, with the next sequence number; the first head of an epoch,
and one after another gate's late claim, comes after this gate's claim
again. A record another writer wrote while this gate writes (a fenced gate of
an older epoch) is written again after it, so compaction cannot leave it
last. The messages are those service/registry/control_log.py reads.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from core.bus import make_producer, send as send_signed
from service.gate.registry_file import RegistryFile
from service.registry.book import VersionBook
from service.registry.control_log import (
    CLAIM,
    HEAD,
    RECORD_PREFIX,
    SCHEMA,
    ControlLog,
    canonical,
)

log = logging.getLogger("service.gate.control")


class NotReplicated(Exception):
    """The gate changed its book but could not publish it (the broker is unreachable); it retries."""


class Publisher:
    """The gate's writes, and what it knows the log holds (`sent`, `sent_head`), so that only changes go out.
    `term` says the epoch this gate writes in (0: it does not write, and publishes nothing)."""

    def __init__(self, bootstrap: str, topic: str, book: VersionBook, shared: ControlLog, evaluation: dict[str, Any],
                 registry: RegistryFile | None, replica: str, url: str, term: Callable[[], int]):
        self.bootstrap, self.topic, self.book, self.shared = bootstrap, topic, book, shared
        self.evaluation, self.registry, self.replica, self.url, self.term = evaluation, registry, replica, url, term
        self.lock = threading.Lock()
        self.producer = None
        self.foreign: set[int] = set()  # versions another writer wrote while we lead: written again
        self.dirty = False  # the last publish failed
        self.forget()

    def forget(self) -> None:
        """A new reading pass: nothing is known to be in the log."""
        self.sent: dict[int, str | None] = {}  # the gate's view of the newest message per key
        self.sent_head: bytes | None = None

    def lead(self, in_log: dict[int, str | None]) -> None:
        """A new term (with `lock` held): the log holds what was read of it; the claim and head go out again."""
        self.sent = dict(in_log)
        self.sent_head = None
        self.foreign.clear()

    @property
    def due(self) -> bool:
        """A publish is owed: the last one failed, the head must go out again, or a foreign record was read."""
        return bool(self.dirty or self.sent_head is None or self.foreign)

    def saw_record(self, version: int, msg: dict[str, Any] | None, epoch: int) -> None:
        """A version's message read while writing in `epoch`: not ours (a fenced gate's), it is written
        again after it."""
        if (self.sent.get(version) is not None if msg is None else
                (msg.get("writer"), msg.get("epoch")) != (self.replica, epoch)):
            self.foreign.add(version)

    def claim(self, epoch: int) -> tuple[str, bytes]:
        return CLAIM, canonical({"schema_version": SCHEMA, "epoch": epoch, "writer": self.replica, "url": self.url,
                                 "at": time.time()})

    def publish(self) -> int:
        """Publish the records that changed since the log last had them, then the head; returns its seq."""
        with self.lock:
            epoch = self.term()
            if not epoch:
                raise NotReplicated("not writing")
            while self.foreign:
                self.sent[self.foreign.pop()] = "foreign"  # matches no digest: written again (or deleted)
            state = self.book.export_state()
            sends: list[tuple[str, bytes | None]] = []
            versions: dict[str, str] = {}
            for raw in state["records"]:
                body = canonical(raw)
                digest = hashlib.sha256(body).hexdigest()[:20]
                versions[str(raw["version"])] = digest
                if self.sent.get(raw["version"]) != digest:
                    sends.append((f"{RECORD_PREFIX}{raw['version']}", canonical(
                        {"schema_version": SCHEMA, "epoch": epoch, "writer": self.replica, "digest": digest,
                         "record": raw})))
            current = {int(v) for v in versions}
            sends += [(f"{RECORD_PREFIX}{v}", None) for v, d in self.sent.items() if v not in current and d]
            head = {"promoted": state["promoted"], "history": state["history"], "pinned": state["pinned"],
                    "evaluation": self.evaluation, "versions": versions}
            body = canonical(head)
            if not sends and body == self.sent_head and not self.dirty:
                return self.shared.seq
            seq = max(self.shared.seq, self.shared.memory_seq) + 1
            msg = {"schema_version": SCHEMA, **head, "seq": seq, "epoch": epoch, "writer": self.replica,
                   "url": self.url}
            # first head of this epoch, or after a fenced claim: our claim again
            claim = [] if self.sent_head is not None else [self.claim(epoch)]
            try:
                self.send([*claim, *sends, (HEAD, canonical(msg))])
            except Exception as exc:
                if not self.dirty:
                    log.error("control plane: could not publish the registry (%s: %s); retrying",
                              type(exc).__name__, exc)
                self.dirty = True
                raise NotReplicated(str(exc)) from exc
            self.dirty = False
            for key, value in sends:
                v = int(key[len(RECORD_PREFIX):])
                if value is None:
                    self.sent.pop(v, None)
                else:
                    self.sent[v] = versions[str(v)]
            self.sent_head = body
            self.shared.seq = self.shared.memory_seq = seq
            if self.registry is not None:
                self.registry.control = {"epoch": epoch, "seq": seq, "writer": self.replica}
            return seq

    def published_seq(self) -> int:
        """The gate's seq after a change of its book (the change was published by `on_change`)."""
        if not self.term():
            raise NotReplicated("this gate no longer writes the registry")
        if self.dirty:
            self.publish()
        return self.shared.seq

    def connect(self) -> None:
        if self.producer is None:
            self.producer = make_producer(self.bootstrap)

    def send(self, messages: list[tuple[str, bytes | None]]) -> None:
        """Send in order and wait until all are written (raises if any is not). Always to partition 0: a topic
        that a restarted broker created on first use may have several partitions, and the order must hold."""
        futures = [send_signed(self.producer, self.topic, key, value, partition=0)  # signed: core/signing.py
                   for key, value in messages]
        self.producer.flush(timeout=10)
        for future in futures:
            future.get(timeout=10)
