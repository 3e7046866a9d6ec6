"""The policy registry kept in a file, so a gate restart forgets no score, promotion, pin or rollback.

The file lives in the adapter store by default (a shared volume in
Kubernetes). It also records how versions were scored (held-out prompt count,
answer length): scores from another evaluation are not comparable, so they
are dropped on load and the promoted version is scored again.
A file that cannot be read is moved aside and the gate starts fresh
rather than refusing to start.

The gate also publishes the registry on the control topic (service/gate/
control.py), where the gateway replicas read it; this file is the gate's own
record: read at start before the topic is, and the state it publishes again
when the topic has lost it (a memory-only broker restarted). It also keeps
the gate's epoch and sequence number on the topic (`control`).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from core.adapter_store import write_file_atomic
from core.contracts import version_name
from service.registry.book import VersionBook

log = logging.getLogger(__name__)

FORMAT = 1


class RegistryFile:
    def __init__(self, path: Path, evaluation: dict[str, Any]):
        self.path = Path(path)
        self.evaluation = evaluation
        self.control: dict[str, Any] = {}  # the control plane's epoch and sequence number, saved with the state
        self._write_lock = threading.Lock()

    def attach(self, book: VersionBook) -> bool:
        """Restore `book` from the file (True if there was one) and save it after every change from now on
        (before the hook that was there, if any)."""
        restored = self._restore(book)
        chained = book.on_change

        def save() -> None:
            self.save(book)
            if chained is not None:
                chained()

        book.on_change = save
        self.save(book)
        return restored

    def save(self, book: VersionBook) -> None:
        # The state is taken under the write lock, so the last write always holds the newest state.
        with self._write_lock:
            state = {"format": FORMAT, "evaluation": self.evaluation, **book.export_state()}
            if self.control:
                state["control"] = dict(self.control)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_file_atomic(self.path, json.dumps(state, indent=1).encode())
            except OSError as exc:  # the registry still works in memory; a later change tries again
                log.error("could not save the policy registry to %s: %s", self.path, exc)

    def _restore(self, book: VersionBook) -> bool:
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            self._set_aside(f"unreadable ({exc})")
            return False
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            self._set_aside(f"format {state.get('format') if isinstance(state, dict) else '?'} is not {FORMAT}")
            return False
        same_eval = state.get("evaluation") == self.evaluation
        self.control = dict(state.get("control") or {})
        try:
            book.restore_state(state, keep_scores=same_eval)
        except (KeyError, TypeError, ValueError) as exc:
            self._set_aside(f"inconsistent ({exc})")
            return False
        log.info("policy registry restored from %s: %s promoted%s, %d versions known%s", self.path,
                 version_name(book.promoted), " (pinned)" if book.pinned else "", len(state["records"]),
                 "" if same_eval else "; the held-out evaluation changed, so versions will be scored again")
        return True

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(self.path.name + ".unreadable")
        log.error("policy registry %s is %s; moved to %s, starting with base promoted", self.path, why, aside.name)
        try:
            self.path.replace(aside)
        except OSError:
            pass
