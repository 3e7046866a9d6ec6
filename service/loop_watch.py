"""Follows the loop's topics to show progress: counts per topic, every published adapter, stale pairs.

Reads with its own assigned consumer (no group), so it never takes messages
from the components. Counts add up over broker restarts: when `odpo up`
restarts its (memory-only) broker, `rewind()` makes the reader start again
from the beginning of the new, empty topics, so nothing is skipped and
nothing is counted twice.

Stale pairs: the trainer drops a pair sampled more than `max_staleness`
versions before its own version. When most of the recent sampled pairs are
that old, a component is behind (typically the generator still sampling with
an old version) and every pair is thrown away; `StalePairs` says so.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError

from core import signing
from core.adapter_store import newest_ready
from core.bus import TopicTail
from core.topics import base_name, topic_name
from core.contracts import (
    DATASET_JUDGE,
    TOPIC_ADAPTERS,
    TOPIC_CANDIDATES,
    TOPIC_DLQ,
    TOPIC_PREFERENCES,
    TOPIC_PROMPTS,
    AdapterReady,
    DeadLetter,
    PreferencePair,
)

WATCHED = (TOPIC_CANDIDATES, TOPIC_PREFERENCES, TOPIC_ADAPTERS, TOPIC_DLQ)  # base names (core/topics.py)
STORE_POLL_S = 5.0


@dataclass(frozen=True)
class StaleState:
    """The recent sampled pairs against the newest published version."""

    alarm: bool = False  # most recent pairs are too old to be trained
    stale: int = 0  # pairs in the window that were older than newest - max_staleness when they arrived
    window: int = 0  # pairs in the window
    newest: int = 0  # the newest published version (topic or store)
    sampled_by: int | None = None  # the version most of the stale pairs were sampled by
    max_staleness: int = 0
    episodes: int = 0  # times the alarm went on
    seen_stale: int = 0  # pairs that were stale when they arrived, in all


class StalePairs:
    """The last `window` sampled pairs, each judged stale or not when it arrived, against the newest version
    known then, as the trainer judges it (dataset pairs excluded: they are off-policy by nature and the trainer
    does not hold their age against them). A new version does not make pairs that already arrived stale."""

    def __init__(self, max_staleness: int, window: int = 30, min_pairs: int = 10, share: float = 0.5):
        self.max_staleness, self.min_pairs, self.share = max_staleness, min_pairs, share
        self._pairs: deque[tuple[int, bool]] = deque(maxlen=window)  # (policy version, stale on arrival)
        self.newest = 0
        self._alarm, self._episodes, self._seen_stale = False, 0, 0

    def pair(self, policy_version: int, judge: str) -> None:
        if judge == DATASET_JUDGE:
            return
        stale = self._is_stale(policy_version)
        self._pairs.append((policy_version, stale))
        self._seen_stale += stale

    def published(self, version: int) -> None:
        """A version known to exist (AdapterReady on the topic, or the newest in the store)."""
        self.newest = max(self.newest, version)

    def _is_stale(self, version: int) -> bool:
        return version < self.newest - self.max_staleness

    def state(self) -> StaleState:
        stale = [v for v, was_stale in self._pairs if was_stale]
        alarm = len(self._pairs) >= self.min_pairs and len(stale) > self.share * len(self._pairs)
        if alarm and not self._alarm:
            self._episodes += 1
        self._alarm = alarm
        sampled_by = Counter(stale).most_common(1)[0][0] if stale else None
        return StaleState(alarm, len(stale), len(self._pairs), self.newest, sampled_by, self.max_staleness,
                          self._episodes, self._seen_stale)


@dataclass
class LoopCounts:
    candidate_sets: int = 0
    pairs: int = 0
    dead_letters: int = 0
    dead_prompts: int = 0
    adapters: list[AdapterReady] = field(default_factory=list)
    stale: StaleState = field(default_factory=StaleState)

    @property
    def latest_version(self) -> int:
        return self.adapters[-1].version if self.adapters else 0


class LoopWatcher(threading.Thread):
    def __init__(self, bootstrap: str, store: Path | None = None, max_staleness: int = 4,
                 tail: TopicTail | None = None):
        super().__init__(name="odpo-loop-watch", daemon=True)
        self.counts = LoopCounts()
        self.stale = StalePairs(max_staleness)
        self.store = store
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._rewind_done: threading.Event | None = None
        self._store_checked = 0.0
        self._tail = tail or TopicTail(bootstrap, [topic_name(t) for t in WATCHED], client_id="odpo-up-watch")

    def snapshot(self) -> LoopCounts:
        with self._lock:
            self._check_store()
            return replace(self.counts, adapters=list(self.counts.adapters), stale=self.stale.state())

    def rewind(self, timeout_s: float = 10.0) -> bool:
        """The broker restarted empty: read from the start of its new topics. Call it while the broker is down,
        so nothing the new broker holds is read before the rewind (which would count it twice); returns once
        the reader has rewound (False if it did not within `timeout_s`)."""
        if not self.is_alive():
            self._tail.rewind()
            return True
        done = threading.Event()
        with self._lock:
            self._rewind_done = done
        return done.wait(timeout_s)

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                with self._lock:
                    done, self._rewind_done = self._rewind_done, None
                if done is not None:
                    self._tail.rewind()
                    done.set()
                records = self._tail.poll()
                with self._lock:
                    for rec in records:
                        # a forged record (dead-lettered by its consumer) is not progress
                        if signing.refusal(rec.topic, rec.value, rec.headers, "up") is None:
                            self.count(base_name(rec.topic), rec.value)
        finally:
            self._tail.close()

    def count(self, topic: str, raw: bytes) -> None:
        """Count one record of the topic `topic` (a base name; the caller holds the lock, or owns the watcher)."""
        c = self.counts
        if topic == TOPIC_CANDIDATES:
            c.candidate_sets += 1
        elif topic == TOPIC_PREFERENCES:
            c.pairs += 1
            try:
                pair = PreferencePair.from_bytes(raw)
            except ValidationError:
                return
            self._check_store()
            self.stale.pair(pair.policy_version, pair.judge)
        elif topic == TOPIC_DLQ:
            c.dead_letters += 1
            try:
                c.dead_prompts += DeadLetter.from_bytes(raw).source_topic == topic_name(TOPIC_PROMPTS)
            except ValidationError:
                pass
        elif topic == TOPIC_ADAPTERS:
            try:
                ready = AdapterReady.from_bytes(raw)
            except ValidationError:
                return
            self.stale.published(ready.version)
            if all(a.version != ready.version for a in c.adapters):  # the trainer re-announces on start
                c.adapters.append(ready)

    def _check_store(self) -> None:
        """The store is the record of versions: after a broker restart the topic no longer shows the newest."""
        if self.store is None or time.monotonic() - self._store_checked < STORE_POLL_S:
            return
        self._store_checked = time.monotonic()
        ready = newest_ready(self.store)
        if ready is not None:
            self.stale.published(ready.version)

    def stop(self) -> None:
        self._stop_event.set()
