"""Reading a topic back in tests, decoded through the contracts (no group: takes nothing from the components)."""

from __future__ import annotations

import time

from core.bus import TopicTail


class MessageTail:
    """One topic from its start, each message decoded with `model`; messages that do not decode are skipped."""

    def __init__(self, bootstrap: str, topic: str, model):
        self.model = model
        self.tail = TopicTail(bootstrap, [topic], client_id="odpo-test-tail")
        self.seen: list = []

    def poll(self, timeout_ms: int = 300) -> list:
        for rec in self.tail.poll(timeout_ms):
            try:
                self.seen.append(self.model.from_bytes(rec.value))
            except ValueError:  # pydantic's ValidationError and bad JSON both are ValueErrors
                pass
        return self.seen

    def wait_for(self, predicate, timeout_s: float = 30, what: str = "a message", count: int = 1) -> list:
        """The messages seen so far that match `predicate`, once there are at least `count` of them."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [m for m in self.poll() if predicate(m)]
            if len(found) >= count:
                return found
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")

    def close(self) -> None:
        self.tail.close()
