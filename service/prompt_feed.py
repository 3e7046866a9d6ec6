"""Feeds bundled prompts to `odpo.prompts`, keeping a bounded backlog ahead of the generator.

A bounded backlog keeps pairs fresh: prompts queued long before a new version
would be sampled by an old one (staleness). Outstanding = prompts sent minus
prompts done (sampled into a candidate set, or dead-lettered), both counted
since the last reset: when the memory-only broker restarts, the prompts that
waited in it are gone and `broker_restarted` starts the count afresh (with a
new producer: an idempotent producer's id dies with the broker).

The position (prompts sent, over all runs of a run folder) is kept in
`feed.json` (`{"sent": N, "prompts": len, "updated_at": unix time}`), written
atomically every few seconds and on close, so a resumed `odpo up` feeds the
prompts after the last one rather than starting from the first again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaProducer
from kafka.errors import KafkaError

from core.adapter_store import write_file_atomic
from core.bus import send
from core.contracts import TOPIC_PROMPTS, PromptEvent
from core.topics import topic_name

log = logging.getLogger(__name__)
FEED_FILE = "feed.json"


def load_position(run_dir: Path) -> int:
    """Prompts a previous run of this folder sent (0 when none, or the file is unreadable)."""
    try:
        return max(0, int(json.loads((Path(run_dir) / FEED_FILE).read_text())["sent"]))
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class PromptFeeder:
    def __init__(self, make_producer: Callable[[], KafkaProducer], prompts: list[PromptEvent], backlog: int,
                 start: int = 0, state_file: Path | None = None, save_every_s: float = 5.0):
        if not prompts:
            raise ValueError("no prompts to feed")
        self._make_producer, self._prompts, self._backlog = make_producer, prompts, backlog
        self._producer = make_producer()
        self.sent = self.start = start  # position in the endless cycle of prompts, over all runs
        self._base_sent, self._base_done = start, 0  # outstanding = (sent - base_sent) - (done - base_done)
        self.lost = 0  # sent, but never done: waiting in a broker that restarted, or failed to send
        self._state_file, self._save_every_s = state_file, save_every_s
        self._saved_at, self._saved_sent = time.monotonic(), start

    @property
    def sent_this_run(self) -> int:
        return self.sent - self.start

    def outstanding(self, done: int) -> int:
        return (self.sent - self._base_sent) - (done - self._base_done)

    def top_up(self, done: int) -> int:
        """Publish prompts until `backlog` are outstanding (`done` = prompts sampled or dead-lettered)."""
        futures = []
        try:
            while self.outstanding(done) + len(futures) < self._backlog:
                event = self._event(self.sent + len(futures))
                futures.append(send(self._producer, topic_name(TOPIC_PROMPTS), event.id, event.to_bytes()))
            if futures:
                self._producer.flush(timeout=30)
        except KafkaError as exc:  # the broker is away: what did not go out is counted below, and skipped
            log.warning("sending prompts: %s", exc)
        if futures:
            failed = sum(1 for f in futures if not f.succeeded())
            self.sent += len(futures)
            if failed:  # not outstanding: nobody will ever sample them
                log.warning("%d of %d prompts were not sent", failed, len(futures))
                self._base_sent += failed
                self.lost += failed
        self.maybe_save()
        return len(futures)

    def _event(self, position: int) -> PromptEvent:
        base = self._prompts[position % len(self._prompts)]
        epoch = position // len(self._prompts)
        return base if epoch == 0 else base.model_copy(update={"id": f"{base.id}-e{epoch}"})

    def broker_restarted(self, done: int) -> int:
        """The prompts waiting in the old broker are gone: count outstanding from zero again, with a new producer.
        Returns how many were lost."""
        gone = max(0, self.outstanding(done))
        self.lost += gone
        self._base_sent, self._base_done = self.sent, done
        old, self._producer = self._producer, self._make_producer()
        try:
            old.close(timeout=1)
        except KafkaError:
            pass
        return gone

    def maybe_save(self) -> None:
        if self.sent != self._saved_sent and time.monotonic() - self._saved_at >= self._save_every_s:
            self.save()

    def save(self) -> None:
        if self._state_file is None:
            return
        data = {"sent": self.sent, "prompts": len(self._prompts), "updated_at": round(time.time(), 3)}
        write_file_atomic(self._state_file, (json.dumps(data) + "\n").encode())
        self._saved_at, self._saved_sent = time.monotonic(), self.sent

    def close(self) -> None:
        self.save()
        self._producer.close(timeout=5)
