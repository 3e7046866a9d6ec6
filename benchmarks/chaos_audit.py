"""What a chaos run is judged by: pairs the judge published against the trainer's archive and ledger,
consecutive versions, client errors, and how long the loop took to recover from each kill.

`PairTail` follows odpo.preferences from outside (its own assigned consumer, no group) and keeps every
pair id with the time it was seen, across broker restarts (a restarted memory-only broker starts empty;
the tail's position is reset to the new beginning). `audit` reads the store after the run.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from core.adapter_store import announced_versions, published_versions
from core.bus import TopicTail
from core.contracts import TOPIC_CANDIDATES, TOPIC_PREFERENCES, PreferencePair
from core.topics import topic_name
from trainer.export import ExportError, archived_pairs
from trainer.ledger import trained_ledger


class PairTail(threading.Thread):
    """Every pair id published on odpo.preferences with the (wall-clock) time it was first seen, and the time
    of the newest candidate set on odpo.candidates (only a live generator publishes those)."""

    def __init__(self, bootstrap: str):
        super().__init__(name="chaos-pair-tail", daemon=True)
        self.bootstrap = bootstrap
        self.seen: dict[str, float] = {}
        self.last_candidates = 0.0
        self._halt = threading.Event()
        self._rewind = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        tail = None
        while not self._halt.is_set():
            try:
                tail = tail or TopicTail(self.bootstrap, [topic_name(TOPIC_PREFERENCES), topic_name(TOPIC_CANDIDATES)],
                                         client_id="odpo-chaos-tail")
                if self._rewind.is_set():
                    self._rewind.clear()
                    tail.rewind()
                records = tail.poll(timeout_ms=500)
            except Exception:  # noqa: BLE001 - the broker is being killed on purpose: reconnect
                if tail is not None:
                    try:
                        tail.close()
                    except Exception:  # noqa: BLE001
                        pass
                tail = None
                self._halt.wait(1)
                continue
            now = time.time()
            with self._lock:
                for rec in records:
                    if rec.topic == topic_name(TOPIC_CANDIDATES):
                        self.last_candidates = now
                        continue
                    try:
                        self.seen.setdefault(PreferencePair.from_bytes(rec.value).id, now)
                    except (ValidationError, ValueError):
                        pass
        if tail is not None:
            tail.close()

    def rewind(self) -> None:
        """The broker was killed: read its new, empty topics from the start (pairs seen twice count once)."""
        self._rewind.set()

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def seen_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for t in self.seen.values() if start <= t < end)

    def first_after(self, moment: float) -> float | None:
        with self._lock:
            later = [t for t in self.seen.values() if t > moment]
        return min(later) if later else None

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seen)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


@dataclass
class Kill:
    component: str
    at: float  # wall clock
    pid: int
    recovered_at: float | None = None

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.at


@dataclass
class ClientLog:
    """Requests of the concurrent clients: successes and errors by kind."""

    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def success(self) -> None:
        with self._lock:
            self.ok += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1


def audit(store: Path, published: dict[str, float], kills: list[Kill], broker_kill_windows: list[float],
          stopping_at: float | None = None) -> dict:
    """The run's ledger. `broker_kill_windows`: times of broker kills; a published pair not in the archive
    that was seen before one of them was in the broker when it died. One first seen after `stopping_at`
    (when `odpo up` was told to stop) went into the embedded broker that stops with the run."""
    try:
        archived = {p.id for p in archived_pairs(store)}
    except ExportError:  # no archive at all: every published pair is missing
        archived = set()
    ledger = trained_ledger(store)
    times_trained = Counter(pid for ids in ledger.values() for pid in ids)
    twice = sorted(pid for pid, n in times_trained.items() if n > 1)
    missing = {pid: t for pid, t in published.items() if pid not in archived}
    in_broker = {pid for pid, t in missing.items() if any(t <= k for k in broker_kill_windows)}
    at_stop = {pid for pid, t in missing.items() if stopping_at is not None and t >= stopping_at} - in_broker
    versions = announced_versions(store) or published_versions(store)
    ledger_versions = sorted(ledger)
    recoveries = [k.recovery_s for k in kills if k.recovery_s is not None]
    return {
        "pairs_published": len(published),
        "pairs_archived": len(archived),
        "pairs_trained": len(times_trained),
        "pairs_trained_twice": len(twice),
        "trained_twice_ids": twice[:20],
        "pairs_lost_with_broker": len(in_broker),
        "pairs_lost_at_stop": len(at_stop),
        "pairs_lost_otherwise": len(missing) - len(in_broker) - len(at_stop),
        "lost_otherwise": sorted((t, pid) for pid, t in missing.items() if pid not in in_broker | at_stop)[:20],
        "versions": ledger_versions,
        "versions_in_store": versions,
        "versions_consecutive": ledger_versions == list(range(1, len(ledger_versions) + 1)),
        "kills": [{"component": k.component, "pid": k.pid, "at": k.at, "recovery_s": k.recovery_s} for k in kills],
        "kills_recovered": len(recoveries),
        "recovery_p50_s": statistics.median(recoveries) if recoveries else None,
        "recovery_max_s": max(recoveries) if recoveries else None,
    }
