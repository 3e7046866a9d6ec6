"""Follows odpo.adapters and hot-swaps each new version into vLLM.

The topic is read without a consumer group, from the beginning, because
every generator replica must serve the newest version whatever it missed.
On start `catch_up` reads to the end and loads only the newest version that
passes its checks, before any prompt is sampled.
"""

from __future__ import annotations

import logging
import threading

import httpx

from generator.adapters import AdapterManager, AdapterRejected
from service.bus import Envelope, Inbox
from service.contracts import AdapterReady

log = logging.getLogger(__name__)


class AdapterWatcher:
    def __init__(self, inbox: Inbox[AdapterReady], adapters: AdapterManager, retry_s: float = 2.0):
        self.inbox, self.adapters, self.retry_s = inbox, adapters, retry_s

    def catch_up(self, halt: threading.Event, poll_ms: int = 200) -> int | None:
        """Read the topic to its current end and serve the newest valid version; returns it (None if none)."""
        consumer = self.inbox.consumer
        tps = list(consumer.assignment())
        end = consumer.end_offsets(tps)
        seen: list[Envelope[AdapterReady]] = []
        # The end offsets are only a lower bound (Tansu answers the last batch's base offset + 1),
        # so read on past them until a poll brings nothing more.
        while not halt.is_set():
            before = {tp: consumer.position(tp) for tp in tps}
            seen.extend(self.inbox.poll(timeout_ms=poll_ms))
            if all(before[tp] >= end[tp] and consumer.position(tp) == before[tp] for tp in tps):
                break
        # Newest first: a version that fails goes to the DLQ and the next newest is tried;
        # older ones are superseded, not failures.
        for env in sorted(seen, key=lambda e: e.value.version, reverse=True):
            if env.value.version <= self.adapters.current_version:
                break
            if self._apply(env, halt):
                log.info("caught up: %d adapter messages, serving version %d", len(seen), env.value.version)
                return env.value.version
        return None

    def run(self, halt: threading.Event, poll_ms: int = 500) -> None:
        while not halt.is_set():
            for env in self.inbox.poll(timeout_ms=poll_ms):
                self._apply(env, halt)

    def _apply(self, env: Envelope[AdapterReady], halt: threading.Event) -> bool:
        """Apply one version; a refused one is dead-lettered; an unreachable server is retried."""
        while not halt.is_set():
            try:
                return self.adapters.apply(env.value)
            except AdapterRejected as exc:
                self.inbox.reject(env, exc.reason)
                return False
            except httpx.TransportError as exc:
                log.warning("vLLM unreachable while loading version %d (%s); retrying", env.value.version, exc)
                halt.wait(self.retry_s)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop hot swaps; the message is kept in the DLQ
                log.exception("loading version %d failed", env.value.version)
                self.inbox.reject(env, f"internal error: {exc!r}")
                return False
        return False
