"""The policy registry: every version the gate knows, its held-out score, and which one is promoted.

Pure bookkeeping (no I/O), shared by the promotion gate's thread and its admin
handlers, and read by every gateway replica's router, so every method takes
the lock and returns quickly.

Rules:
- Version 0 (`base`) is promoted at start; the gate scores it first.
- A new version waits as `pending`; the gate scores the newest pending one
  and marks older pending ones `superseded` (a backlog never delays the
  newest version behind stale ones). When the newest one cannot be scored
  (`failed`: damaged files, engine errors), those wait again.
- A scored version is promoted unless the gate's verdict
  (service/gate/verdict.py: the paired score difference against the
  promoted version and the quality signals) refuses it, naming the signal
  (then `refused`); without a verdict, unless its score is below the promoted
  version's by more than `tolerance`. While pinned, a version that passes
  stays `passed` and traffic stays where the operator pinned it.
- Each scored version keeps its per-prompt evaluation rows (answers, scores,
  signals): the next candidate is compared with them prompt by prompt. The
  admin snapshot leaves them out (`answers(version)` returns them).
- Operators may promote any known version, pin, unpin and roll back to the
  version promoted before the current one.

The book can be exported and restored (`export_state` / `restore_state`) and
calls `on_change` after every change, so the gate keeps it in a file
(`service.gate.registry_file`) and a restart forgets no decision, and
publishes it on the control topic; each gateway replica's copy takes it over
with `apply_replicated` (`service.registry.control_log`).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from core.contracts import AdapterReady, version_name

PENDING, EVALUATING, PASSED, REFUSED, SUPERSEDED, FAILED, ROLLED_BACK = (
    "pending", "evaluating", "passed", "refused", "superseded", "failed", "rolled_back")


class BookError(Exception):
    """An operator request that cannot be done; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass
class VersionRecord:
    version: int
    status: str = PENDING
    score: float | None = None
    reason: str = ""
    path: str | None = None
    sha256: str | None = None
    parent_version: int | None = None
    pairs_trained: int | None = None
    train_metrics: dict[str, Any] = field(default_factory=dict)
    published_at: float | None = None
    evaluated_at: float | None = None
    signals: dict[str, Any] = field(default_factory=dict)  # judge/signals.py summary of its held-out answers
    refused_by: str = ""  # the signal that refused it ("score", "mean_words", ...)
    superseded_by: int | None = None  # the newer version chosen over it; pending again if that one fails
    rows: list[dict[str, Any]] = field(default_factory=list)  # per-prompt evaluation rows, prompt order


_RECORD_FIELDS = frozenset(f.name for f in fields(VersionRecord))


@dataclass(frozen=True)
class Decision:
    """What the gate decided for one scored version."""

    version: int
    score: float
    promoted: bool
    status: str
    reason: str
    previous: int  # the version promoted before the decision


def _record_from(raw: dict[str, Any]) -> VersionRecord:
    """A record from its exported (or replicated) form; fields this version of odpo does not know are ignored."""
    return VersionRecord(**{k: v for k, v in raw.items() if k in _RECORD_FIELDS})


def _changes(changed: Callable[[Any], bool] = lambda result: True):
    """Call the book's `on_change` after the method returns (the lock is released by then), if `changed`
    says its result means the book changed: the gate polls often, and an idle poll writes nothing."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self: "VersionBook", *args, **kwargs):
            result = method(self, *args, **kwargs)
            if self.on_change is not None and changed(result):
                self.on_change()
            return result

        return wrapper

    return decorate


class VersionBook:
    def __init__(self, tolerance: float, max_records: int = 200, max_history: int = 100):
        self.tolerance = tolerance
        self._max_records, self._max_history = max_records, max_history
        self._lock = threading.Lock()
        self._records: dict[int, VersionRecord] = {0: VersionRecord(0)}
        self._promoted = 0
        self._history: list[int] = [0]  # promoted versions, oldest first; rollback pops
        self._pinned = False
        self._evaluating: int | None = None
        self.on_change: Callable[[], None] | None = None

    # -- reading -------------------------------------------------------------------------------------
    @property
    def promoted(self) -> int:
        return self._promoted

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def evaluating(self) -> int | None:
        return self._evaluating

    def in_use(self) -> set[int]:
        """The versions the gateway routes to or scores now: the promoted one and the one being scored."""
        with self._lock:
            return {self._promoted} | ({self._evaluating} if self._evaluating is not None else set())

    def newest(self) -> int:
        """The newest version the book knows."""
        with self._lock:
            return max(self._records)

    def status_of(self, version: int) -> str | None:
        """`version`'s status, without copying its record (None: unknown here)."""
        with self._lock:
            rec = self._records.get(version)
            return rec.status if rec else None

    def record(self, version: int) -> VersionRecord | None:
        with self._lock:
            rec = self._records.get(version)
            return VersionRecord(**asdict(rec)) if rec else None

    def snapshot(self) -> dict[str, Any]:
        """The admin view: promoted version, pin, tolerance and every record (newest first)."""
        with self._lock:
            versions = []
            for r in sorted(self._records.values(), key=lambda r: -r.version):
                view = {**asdict(r), "name": version_name(r.version), "promoted": r.version == self._promoted}
                view["prompts_scored"] = len(view.pop("rows"))
                versions.append(view)
            return {"promoted": self._promoted, "promoted_name": version_name(self._promoted),
                    "pinned": self._pinned, "tolerance": self.tolerance, "history": list(self._history),
                    "versions": versions}

    # -- the gate ------------------------------------------------------------------------------------
    @_changes(lambda added: added)
    def add(self, ready: AdapterReady) -> bool:
        """Record a published version (pending); False for one already known."""
        with self._lock:
            if ready.version in self._records:
                return False
            self._records[ready.version] = VersionRecord(
                ready.version, path=ready.path, sha256=ready.sha256, parent_version=ready.parent_version,
                pairs_trained=ready.pairs_trained, train_metrics=ready.metrics.model_dump(),
                published_at=ready.created_at)
            self._trim()
            return True

    @_changes(lambda chosen: chosen[0] is not None)
    def next_evaluation(self) -> tuple[int | None, list[int]]:
        """The version to score next (marked `evaluating`) and the pending ones it supersedes.

        The promoted version goes first while it has no score: every
        comparison needs it.
        """
        with self._lock:
            incumbent = self._records[self._promoted]
            if incumbent.score is None:
                chosen = self._promoted
                superseded: list[int] = []
            else:
                pending = sorted(v for v, r in self._records.items() if r.status == PENDING)
                if not pending:
                    return None, []
                chosen, superseded = pending[-1], pending[:-1]
                for v in superseded:
                    rec = self._records[v]
                    rec.status, rec.superseded_by = SUPERSEDED, chosen
                    rec.reason = f"v{chosen} was published before it was scored"
            self._records[chosen].status = EVALUATING
            self._evaluating = chosen
            return chosen, superseded

    def answers(self, version: int) -> list[dict[str, Any]] | None:
        """The per-prompt evaluation rows of a version (None for an unknown one)."""
        with self._lock:
            rec = self._records.get(version)
            return [dict(r) for r in rec.rows] if rec else None

    @_changes()
    def set_evaluation(self, version: int, rows: list[dict[str, Any]], signals: dict[str, Any]) -> None:
        """Keep (more) evaluation rows of a version already decided, e.g. the promoted one scored on more
        prompts to compare a candidate with; its score becomes the mean over them."""
        with self._lock:
            rec = self._records.get(version)
            if rec is not None:
                rec.rows, rec.signals = [dict(r) for r in rows], dict(signals)
                rec.score = signals.get("score", rec.score)

    @_changes()
    def decide(self, version: int, score: float, verdict: Any = None, rows: list[dict[str, Any]] | None = None,
               signals: dict[str, Any] | None = None) -> Decision:
        """Record `version`'s score and promote it if it is good enough (and traffic is not pinned).

        `verdict` (service.gate.verdict.Verdict) decides when given; otherwise the score alone against
        the promoted version's, within the tolerance. `signals` are kept when no verdict brings them (the
        promoted version, base at the start, is scored without one)."""
        with self._lock:
            self._evaluating = None
            rec = self._records[version]
            rec.score, rec.evaluated_at = score, time.time()
            if rows is not None:
                rec.rows = [dict(r) for r in rows]
            if verdict is not None:
                rec.signals = dict(verdict.signals)
            elif signals is not None:
                rec.signals = dict(signals)
            previous = self._promoted
            ref = self._records[previous].score
            rec.refused_by = ""
            if version == previous or ref is None:
                rec.status, rec.reason = PASSED, "" if version == previous else "nothing scored to compare with"
            elif verdict is not None:
                rec.status = PASSED if verdict.passed else REFUSED
                rec.reason, rec.refused_by = verdict.reason, verdict.signal or ""
            elif score < ref - self.tolerance:
                rec.status = REFUSED
                rec.reason = (f"held-out score {score:.4f} is below {version_name(previous)}'s {ref:.4f} "
                              f"by more than the tolerance {self.tolerance:g}")
            else:
                rec.status, rec.reason = PASSED, ""
            promote = rec.status == PASSED and version > previous
            if promote and self._pinned:
                promote, rec.reason = False, f"traffic is pinned to {version_name(previous)}"
            elif rec.status == PASSED and version < previous:
                rec.reason = f"the newer {version_name(previous)} is promoted"
            if promote:
                self._set_promoted(version)
            return Decision(version, score, promote, rec.status, rec.reason, previous)

    @_changes()
    def fail(self, version: int, reason: str) -> list[int]:
        """The gate could not score `version` (not loadable, engine errors): it is not promoted. The versions
        it superseded wait to be scored again (a damaged newest version does not void the good ones before
        it); returns them."""
        with self._lock:
            self._evaluating = None
            rec = self._records[version]
            rec.status, rec.reason, rec.evaluated_at = FAILED, reason, time.time()
            revived = sorted(v for v, r in self._records.items()
                             if r.status == SUPERSEDED and r.superseded_by == version)
            for v in revived:
                r = self._records[v]
                r.status, r.reason, r.superseded_by = PENDING, "", None
            return revived

    @_changes()
    def requeue(self, version: int) -> None:
        """Put a version back to pending (the engine was not ready to score it yet)."""
        with self._lock:
            self._evaluating = None
            self._records[version].status = PENDING

    # -- operators -----------------------------------------------------------------------------------
    @_changes()
    def promote(self, version: int) -> int:
        """Promote a known version whatever the gate said; returns the version promoted before."""
        with self._lock:
            if version not in self._records:
                raise BookError(f"unknown version {version}", 404)
            previous = self._promoted
            if version != previous:
                self._set_promoted(version)
            return previous

    @_changes()
    def rollback(self) -> tuple[int, int]:
        """Return traffic to the version promoted before the current one; returns (from, to)."""
        with self._lock:
            if len(self._history) < 2:  # _trim keeps every version in the history
                raise BookError(f"nothing to roll back to: {version_name(self._promoted)} is the first promoted")
            current = self._history.pop()
            self._promoted = self._history[-1]
            rec = self._records[current]
            if current != self._promoted:
                rec.status, rec.reason = ROLLED_BACK, f"rolled back to {version_name(self._promoted)}"
            return current, self._promoted

    @_changes()
    def pin(self, version: int | None = None) -> None:
        """Keep traffic on `version` (default: the promoted one) until unpinned."""
        with self._lock:
            if version is not None:
                if version not in self._records:
                    raise BookError(f"unknown version {version}", 404)
                if version != self._promoted:
                    self._set_promoted(version)
            self._pinned = True

    @_changes()
    def unpin(self) -> None:
        """Let the gate promote again (from the next version it scores)."""
        with self._lock:
            self._pinned = False

    # -- persistence ---------------------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """Everything a restart needs: every record, the promoted version, its history and the pin."""
        with self._lock:
            return {"promoted": self._promoted, "history": list(self._history), "pinned": self._pinned,
                    "records": [asdict(r) for r in sorted(self._records.values(), key=lambda r: r.version)]}

    def restore_state(self, state: dict[str, Any], keep_scores: bool = True) -> None:
        """Take over an exported state. A version being scored when it was saved is pending again;
        `keep_scores=False` (the held-out evaluation changed since) forgets every score, so the
        promoted version is scored again before a new version is compared with it."""
        records = {}
        for raw in state["records"]:
            rec = _record_from(raw)
            if rec.status == EVALUATING:
                rec.status = PENDING
            if not keep_scores:  # verdicts stay as they were given; only the numbers are not comparable
                rec.score, rec.rows, rec.signals = None, [], {}
            records[rec.version] = rec
        records.setdefault(0, VersionRecord(0))
        promoted = int(state["promoted"])
        if promoted not in records:
            raise ValueError(f"the promoted version {promoted} has no record")
        with self._lock:
            self._records = records
            self._promoted = promoted
            self._history = [v for v in state.get("history", [promoted]) if v in records] or [promoted]
            self._pinned = bool(state.get("pinned", False))
            self._evaluating = None

    # -- replication (service/registry/control_log.py) ------------------------------------------------
    def apply_replicated(self, records: Iterable[dict[str, Any]], removed: Iterable[int], head: dict[str, Any],
                         full: bool = False) -> None:
        """Take over what the leader replica published: these records (each replacing the record of its
        version; with `full`, every record not given is dropped), the removed versions and the head (promoted
        version, history, pin), all at once under the lock. Statuses stay as the leader set them, `evaluating`
        included (it is scoring that version). No `on_change`: the caller is the replication itself, and a
        change it made must not travel back to Kafka."""
        taken = {rec.version: rec for rec in map(_record_from, records)}
        promoted = int(head["promoted"])
        with self._lock:
            merged = {} if full else dict(self._records)
            for v in removed:
                merged.pop(v, None)
            merged.update(taken)
            merged.setdefault(0, VersionRecord(0))
            if promoted not in merged:
                raise ValueError(f"the promoted version {promoted} has no record")
            self._records = merged
            self._promoted = promoted
            self._history = [v for v in head.get("history", [promoted]) if v in merged] or [promoted]
            self._pinned = bool(head.get("pinned", False))
            self._evaluating = next((v for v, r in merged.items() if r.status == EVALUATING), None)

    # -- internals (lock held) -----------------------------------------------------------------------
    def _set_promoted(self, version: int) -> None:
        self._promoted = version
        self._history.append(version)
        del self._history[:-self._max_history]

    def _trim(self) -> None:
        """Forget the oldest records beyond `max_records`, never a promoted or remembered one."""
        keep = set(self._history) | {self._promoted, 0}
        if self._evaluating is not None:
            keep.add(self._evaluating)
        for v in sorted(self._records):
            if len(self._records) <= self._max_records:
                break
            if v not in keep:
                del self._records[v]
