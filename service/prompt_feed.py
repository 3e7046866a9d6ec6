"""Feeds bundled prompts to `odpo.prompts`, keeping a bounded backlog ahead of the generator.

A bounded backlog keeps pairs fresh: prompts queued long before a new version
would be sampled by an old one (staleness).
"""

from __future__ import annotations

from kafka import KafkaProducer

from service.bus import publish
from service.contracts import TOPIC_PROMPTS, PromptEvent


class PromptFeeder:
    def __init__(self, producer: KafkaProducer, prompts: list[PromptEvent], backlog: int):
        if not prompts:
            raise ValueError("no prompts to feed")
        self._producer, self._prompts, self._backlog = producer, prompts, backlog
        self.sent = 0

    def top_up(self, done: int) -> int:
        """Publish prompts until `backlog` are outstanding (`done` = prompts sampled or dead-lettered)."""
        published = 0
        while self.sent - done < self._backlog:
            base = self._prompts[self.sent % len(self._prompts)]
            epoch = self.sent // len(self._prompts)
            event = base if epoch == 0 else base.model_copy(update={"id": f"{base.id}-e{epoch}"})
            publish(self._producer, TOPIC_PROMPTS, event.id, event, flush=False)
            self.sent += 1
            published += 1
        if published:
            self._producer.flush()
        return published

    def close(self) -> None:
        self._producer.close()
