"""Follows the loop's topics to show progress: counts per topic and every published adapter.

Reads with its own assigned consumer (no group), so it never takes messages
from the components.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pydantic import ValidationError

from service.bus import TopicTail

from service.contracts import (TOPIC_ADAPTERS, TOPIC_CANDIDATES, TOPIC_DLQ, TOPIC_PREFERENCES, TOPIC_PROMPTS,
                               AdapterReady, DeadLetter)

WATCHED = (TOPIC_CANDIDATES, TOPIC_PREFERENCES, TOPIC_ADAPTERS, TOPIC_DLQ)


@dataclass
class LoopCounts:
    candidate_sets: int = 0
    pairs: int = 0
    dead_letters: int = 0
    dead_prompts: int = 0
    adapters: list[AdapterReady] = field(default_factory=list)

    @property
    def latest_version(self) -> int:
        return self.adapters[-1].version if self.adapters else 0


class LoopWatcher(threading.Thread):
    def __init__(self, bootstrap: str):
        super().__init__(name="odpo-loop-watch", daemon=True)
        self.counts = LoopCounts()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._tail = TopicTail(bootstrap, WATCHED, client_id="odpo-up-watch")

    def snapshot(self) -> LoopCounts:
        with self._lock:
            c = self.counts
            return LoopCounts(c.candidate_sets, c.pairs, c.dead_letters, c.dead_prompts, list(c.adapters))

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                records = self._tail.poll()
                with self._lock:
                    for rec in records:
                        self._count(rec.topic, rec.value)
        finally:
            self._tail.close()

    def _count(self, topic: str, raw: bytes) -> None:
        c = self.counts
        if topic == TOPIC_CANDIDATES:
            c.candidate_sets += 1
        elif topic == TOPIC_PREFERENCES:
            c.pairs += 1
        elif topic == TOPIC_DLQ:
            c.dead_letters += 1
            try:
                c.dead_prompts += DeadLetter.from_bytes(raw).source_topic == TOPIC_PROMPTS
            except ValidationError:
                pass
        elif topic == TOPIC_ADAPTERS:
            try:
                c.adapters.append(AdapterReady.from_bytes(raw))
            except ValidationError:
                pass

    def stop(self) -> None:
        self._stop_event.set()
