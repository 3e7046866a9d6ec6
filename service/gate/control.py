"""The gate as the one writer of the control topic: it claims an epoch, reads it back, then publishes its book.

The gate reads the topic as every reader does (service/registry/follower.py).
Once it has read it to its end it claims epoch = (highest seen) + 1; when it
reads its own claim back it has read everything before it, so it takes that
state (a version scored by a gate before it is pending again; scores of
another held-out evaluation are dropped), republishes what the log lacks (all
of it when the topic is empty: a memory-only broker restarted, and the state
comes from the registry file), and from then on publishes every change of
its book (service/gate/publish.py). Only then does the promotion gate decide
(`term`).

There is no election: one gate runs (`odpo up` restarts it when it dies; the
chart runs one replica with the `Recreate` strategy). Should a second one
start anyway, the newer claim wins: the older gate reads it, stops deciding
and never claims again (`odpo_gate_writing` 0, /readyz 503, a loud log line),
and every reader follows the newer one, so no decision is made twice.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

from service.gate.metrics import WRITING, ScoreGauge, sync_promoted
from service.gate.publish import NotReplicated, Publisher
from service.gate.registry_file import RegistryFile
from service.registry.book import VersionBook
from service.registry.control_log import CLAIM, RECORD_PREFIX, Taken
from service.registry.follower import RegistryFollower

__all__ = ["GateControl", "NotReplicated"]

log = logging.getLogger("service.gate.control")

READING, CLAIMING, WRITING_ROLE, FENCED = "reading", "claiming", "writing", "fenced"
CLAIM_READ_BACK_S = 30


class GateControl(RegistryFollower):
    def __init__(self, book: VersionBook, bootstrap: str, topic: str, scores: ScoreGauge,
                 evaluation: dict[str, Any], registry: RegistryFile | None = None):
        self.writer_id = f"gate-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        remembered = registry.control if registry is not None else {}
        super().__init__(book, bootstrap, topic, "gate", scores=scores, remembered=remembered)
        self.evaluation, self.registry, self.scores = evaluation, registry, scores
        self.writes = Publisher(bootstrap, topic, book, self.shared, evaluation, registry, self.writer_id,
                                "", lambda: self.term)
        self.role = READING
        self.epoch = 0  # epoch of this gate's claim while claiming or writing
        self._claimed_at = 0.0
        self._wrote = False  # this gate has written: its book is at least as new as its own heads on the topic
        self._downstream = None

    def attach(self) -> GateControl:
        """Publish every change of the book while writing (before the hooks that were there)."""
        chained = self.book.on_change

        def changed() -> None:
            if self.role == WRITING_ROLE:
                try:
                    self.writes.publish()
                except NotReplicated:
                    pass  # retried by the reading thread; an admin call sees `dirty`
            else:  # the gate thread finishing a step after a newer gate claimed: the log's state is taken again
                self.shared.diverged = True
            if chained is not None:
                chained()

        self.book.on_change = changed
        self._downstream = chained
        return self

    @property
    def term(self) -> int:
        """The epoch this gate writes in (0 while it does not): a version is decided only in the term it was
        picked in."""
        return self.epoch if self.role == WRITING_ROLE else 0

    @property
    def dirty(self) -> bool:
        return self.writes.dirty

    def view(self) -> dict[str, Any]:
        return {**super().view(), "gate": self.writer_id, "role": self.role, "writing": self.role == WRITING_ROLE}

    def stop(self) -> None:
        super().stop()
        if self.writes.producer is not None:
            try:
                self.writes.producer.close(timeout=2)
            except Exception:  # noqa: BLE001 - shutting down: a broken connection is gone either way
                pass
        WRITING.set(0)

    def published_seq(self) -> int:
        """The seq after a change of the book (published by `on_change`; raises NotReplicated if it is not)."""
        return self.writes.published_seq()

    # -- the reader's hooks --------------------------------------------------------------------------
    def _connected(self) -> None:
        if self.role in (CLAIMING, WRITING_ROLE):
            self._set_role(READING, "the control topic is read again")
        self.writes.connect()
        self.writes.forget()

    def _applies(self) -> bool:
        """A starting gate takes the log's state; one reading again after an outage keeps its book (what it
        decided meanwhile is published once it writes again); a fenced one follows the newer gate."""
        return self.role == FENCED or (self.role == READING and not self._wrote)

    def _taken(self, taken: Taken) -> None:
        """Our claim read back (write), a newer gate's claim or head (fenced), another writer's late message."""
        if taken.kind == RECORD_PREFIX:
            if self.role == WRITING_ROLE:
                self.writes.saw_record(taken.version, taken.msg, self.epoch)
            return
        ours = (taken.writer, taken.epoch) == (self.writer_id, self.epoch)
        mine = self.role in (CLAIMING, WRITING_ROLE)
        if taken.kind == CLAIM:
            if not taken.accepted:
                if self.role == WRITING_ROLE and taken.writer != self.writer_id:
                    self.writes.sent_head = None  # a late, older claim: ours and the head again after it
                elif self.role == CLAIMING and ours:
                    self._fence(f"epoch {taken.epoch} was claimed first by {self.shared.owner}")
                return
            if self.role == CLAIMING and ours:
                self._write()
            elif not ours and taken.writer != self.writer_id and (mine or self.role == READING) \
                    and self.shared.caught_up:
                self._fence(f"gate {taken.writer} claimed epoch {taken.epoch}")
            return
        if not taken.accepted:
            if self.role == WRITING_ROLE:  # a fenced head: ours again after it
                self.writes.sent_head = None
            return
        if ours and self.role == WRITING_ROLE:
            self.shared.set_applied(int(taken.msg["seq"]))  # our own head: the book already holds it
        elif mine and taken.writer != self.writer_id and taken.epoch >= self.epoch:
            self._fence(f"gate {taken.writer} wrote epoch {taken.epoch}")

    def _act(self) -> None:
        """Claim once the topic is read; give up a claim not read back; retry a failed publish."""
        if self.role == CLAIMING and time.monotonic() - self._claimed_at > CLAIM_READ_BACK_S:
            self._set_role(READING, f"the claim was not read back within {CLAIM_READ_BACK_S} s")
        if self.role == READING and self.shared.caught_up:
            self._claim()
        if self.role == WRITING_ROLE and self.writes.due:
            try:
                self.writes.publish()
            except NotReplicated:
                pass
        if self.role == FENCED and self.shared.diverged and self.shared.caught_up:
            self.shared.apply()

    def _after_change(self, head: dict[str, Any]) -> None:
        """A state read from the log (not while writing): file, holds, metrics."""
        if self.registry is not None:
            self.registry.evaluation = head.get("evaluation") or self.evaluation
            self.registry.control = {"epoch": self.shared.memory_epoch,
                                     "seq": max(self.shared.memory_seq, int(head["seq"])), "writer": head["writer"]}
        sync_promoted(self.book)
        if self._downstream is not None:
            self._downstream()

    # -- writing -------------------------------------------------------------------------------------
    def _claim(self) -> None:
        epoch = max(self.shared.epoch, self.shared.memory_epoch) + 1
        try:
            self.writes.send([self.writes.claim(epoch)])
        except Exception as exc:  # noqa: BLE001 - the next poll tries again
            log.warning("gate: could not claim epoch %d (%s); retrying", epoch, exc)
            return
        self.epoch, self._claimed_at = epoch, time.monotonic()
        self._set_role(CLAIMING, f"claimed epoch {epoch}; writing once it is read back")

    def _write(self) -> None:
        """Our claim was read back, so the log before it is all read: take its state (unless this gate wrote
        before: its book is newer) and write from now on."""
        if not self._wrote:
            self.shared.apply()
        head = self.shared.head
        same_eval = head is None or head.get("evaluation") == self.evaluation
        self.book.restore_state(self.book.export_state(), keep_scores=same_eval)  # `evaluating` -> pending
        if not same_eval:
            log.warning("gate: the registry's scores come from another held-out evaluation; versions will be "
                        "scored again")
        if self.registry is not None:
            self.registry.evaluation = self.evaluation
        with self.writes.lock, self._lock:
            self.writes.lead(self.shared.in_log)
            self.role, self._wrote = WRITING_ROLE, True
        WRITING.set(1)
        log.warning("gate: %s writes the registry (epoch %d); %s", self.writer_id, self.epoch,
                    "state read back from the topic" if head is not None else
                    f"{self.topic} held no state, published from the registry file")
        try:
            self.writes.publish()
        except NotReplicated:
            pass

    def _fence(self, why: str) -> None:
        """A newer gate writes the registry: this one stops deciding for good and follows it."""
        was = self.role
        with self._lock:
            self.role, self.shared.applied_digests = FENCED, None
        WRITING.set(0)
        if was != FENCED:
            log.error("gate: %s; this gate (%s) decides nothing from now on (one gate must run: stop this one)",
                      why, self.writer_id)
        if self.shared.caught_up:
            self.shared.apply()

    def _set_role(self, role: str, why: str) -> None:
        was = self.role
        with self._lock:
            self.role = role
        if was == WRITING_ROLE and role != WRITING_ROLE:
            WRITING.set(0)
            log.warning("gate: stopped writing (%s)", why)
        else:
            log.info("gate: %s", why)
