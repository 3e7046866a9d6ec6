"""Back-pressure of `odpo up`: no new prompts while the trainer already has enough pairs waiting.

On a small machine the trainer is the slowest part (a 16-pair window took
about 3 minutes on 2 cores beside vLLM). Without a bound, the generator and
the judge kept making pairs faster than it read them: in a 60-minute run 51%
of the pairs were stale (sampled more than `max_staleness` versions back)
when the trainer came to them and were dropped, and the CPU that made them
was taken from the trainer. The feeder now holds while the trainer's
consumer group lags `limit` pairs or more behind `odpo.preferences` (pairs
published that the trainer has not committed: its window under way and
those waiting), and feeds again once it is below. The lag is Kafka's own
measure of a consumer being behind (the group's committed offset against the
topic's end), read without joining the group.

The default limit, one window, makes sampling and training take turns: the
window under way is uncommitted, so the feed holds while it trains (the
prompts already fed are still sampled), and a fresh window is sampled while
the trainer waits for it. Where both share the same cores (2 here) that costs
no throughput and every pair is at most a version or two old; where they run
on separate hardware, two windows (`--pair-backlog 32`) let them overlap.

Never a deadlock: the trainer commits past a pair it dropped (a duplicate,
a stale one) only once no pair before it waits in its window, so dropped
pairs behind a part-filled window count in the lag, and a lag made of them
could hold the feed while the trainer waits for pairs that never come
(measured: a run whose trainer dropped 24 stale pairs held its feed 5
minutes at a time). So the pairs it dropped since its offsets last moved
(`odpo_trainer_pairs_dropped_total` on its /metrics, `trainer_metrics`) are
taken off the lag: `pending` is what it will still train. A trainer whose
/metrics answer is alive and busy with `pending`, so the hold waits for it
however long its window takes (measured: a fixed 300 s limit released the
feed under a 380 s first window; vLLM and the judge then took the cores, the
next window took over 17 minutes and the lag grew to 289 pairs). Only where
its /metrics cannot be read does the hold last just while it makes progress: once its
committed offsets have not moved for `stall_s` (600 s), or three times the
longest wait between two of its commits so far if that is longer, the feed
goes on. The trainer sets the pace: measured, a first window (the model
loading, the first reference passes) took 380 s on a busy machine, and a
300 s floor let the feed run 99 pairs ahead.

Fail-open: while the lag cannot be read (broker restarting, no group yet)
nothing is held, so a fault here never stops the loop.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from core.bus import new_consumer
from core.contracts import TOPIC_PREFERENCES
from core.topics import topic_name
from service.up_metrics import sample_sum

log = logging.getLogger(__name__)


class TrainerBacklog:
    """The trainer's lag, refreshed every `every_s` by a thread of its own (`start`), so a broker that does not
    answer never blocks odpo up's loop; `refresh` reads it once, in the caller's thread."""

    def __init__(self, bootstrap: str, group_id: str, limit: int, every_s: float = 2.0, stall_s: float = 600.0,
                 trainer_metrics: str | None = None):
        self.bootstrap, self.group_id, self.limit = bootstrap, group_id, limit
        self.every_s, self.stall_s, self.trainer_metrics = every_s, stall_s, trainer_metrics
        self._dropped_at_progress: float | None = None  # its dropped-pairs counter when its offsets last moved
        self.pending: int | None = None  # the lag less the pairs dropped since then: what it will still train
        self.trainer_seen = False  # its /metrics answered at the last refresh: it is alive, so no stall limit
        self._committed: int | None = None  # the group's committed offsets, summed, when last read
        self._progress_at = time.monotonic()  # when they last moved (or the start)
        self._longest_gap = 0.0  # the longest wait between two moves so far
        self._consumer: KafkaConsumer | None = None
        self.lag: int | None = None  # pairs the group has not committed (None: unknown)
        self._held_s = 0.0  # seconds the feed was held, over the run, before the hold under way
        self._held_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "TrainerBacklog":
        if self.limit > 0:
            self._thread = threading.Thread(target=self._run, name="odpo-up-pace", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.every_s)

    def refresh(self) -> int | None:
        """Read the lag now: odpo.preferences' end offsets against the group's committed ones."""
        dropped = self._trainer_dropped()
        self.trainer_seen = dropped is not None
        try:
            if self._consumer is None:  # the group's id, never subscribed: reads its offsets without joining it
                self._consumer = new_consumer(self.bootstrap, group_id=self.group_id, enable_auto_commit=False,
                                              client_id="odpo-up-pace", request_timeout_ms=10_000)
            topic = topic_name(TOPIC_PREFERENCES)
            parts = self._consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            ends = self._consumer.end_offsets(tps) if tps else {}
            committed = {tp: self._consumer.committed(tp) or 0 for tp in ends}
            if sum(committed.values()) != self._committed:
                now = time.monotonic()
                if self._committed is not None:  # the first read is where the trainer stands, not a move
                    self._longest_gap = max(self._longest_gap, now - self._progress_at)
                self._committed, self._progress_at = sum(committed.values()), now
                self._dropped_at_progress = dropped  # a new baseline (None: taken at the next read)
            self.lag = sum(max(0, end - committed[tp]) for tp, end in ends.items())
        except Exception as exc:  # noqa: BLE001 (the broker away, or closed under it at stop): unknown, never held
            log.debug("trainer lag unknown: %s", exc)
            self.lag = None
            self._close_consumer()
        since = 0
        if dropped is not None:
            if self._dropped_at_progress is None:
                self._dropped_at_progress = dropped
            elif dropped < self._dropped_at_progress:  # a new trainer process counts from 0
                self._dropped_at_progress = 0.0
            since = int(dropped - self._dropped_at_progress)
        self.pending = None if self.lag is None else max(0, self.lag - since)
        return self.lag

    def _trainer_dropped(self) -> float | None:
        """The trainer's odpo_trainer_pairs_dropped_total, all reasons (None: its /metrics cannot be read)."""
        if self.trainer_metrics is None:
            return None
        try:
            return sample_sum(httpx.get(self.trainer_metrics, timeout=2).text, "odpo_trainer_pairs_dropped_total")
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("trainer drops unknown: %s", exc)
            return None

    def full(self) -> bool:
        """True while the feed should hold (limit 0: never)."""
        now = time.monotonic()
        held = self.limit > 0 and self.pending is not None and self.pending >= self.limit \
            and (self.trainer_seen or now - self._progress_at < self.patience_s)
        if held and self._held_since is None:
            self._held_since = now
        elif not held and self._held_since is not None:
            self._held_s += now - self._held_since
            self._held_since = None
        return held

    @property
    def patience_s(self) -> float:
        """How long the hold waits for the trainer's next commit: stall_s, or 3x its slowest window so far."""
        return max(self.stall_s, 3 * self._longest_gap)

    @property
    def held_s(self) -> float:
        """Seconds the feed was held, over the run, the hold under way included."""
        ongoing = time.monotonic() - self._held_since if self._held_since is not None else 0.0
        return self._held_s + ongoing

    def _close_consumer(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except KafkaError:
                pass
            self._consumer = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)  # a daemon: one blocked on an absent broker is left behind
        self._close_consumer()
