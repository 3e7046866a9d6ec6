"""Follows odpo.adapters and the adapter store, and hot-swaps each new version into vLLM.

The topic is the fast path: it is read without a consumer group, from the
beginning, because every generator replica must serve the newest version
whatever it missed. The store is the record (a topic can lose old messages:
retention, a recreated topic, a new or restarted broker), so the watcher also
reads the store's announced versions at start and every `store_check_s`, and
loads the newest one that passes its checks when the topic did not bring it. A generator
that learned versions only from the topic would sample with `base` while the
trainer is at v10, and every pair it made would be dropped as stale.

On start `catch_up` reads the topic to its end, then the store, and loads only
the newest version that passes its checks, before any prompt is sampled. At
every store check the names of versions whose folders retention deleted are
unloaded (the only names it is safe to unload: generator/adapters.py).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx

from generator.adapters import AdapterManager, AdapterRejected
from generator.metrics import STORE_CATCH_UPS, VERSIONS_BEHIND
from core.adapter_store import NotAnnounced, announced_versions, check_announced, read_manifest
from core.bus import Envelope, Inbox
from core.contracts import AdapterReady, version_name

log = logging.getLogger(__name__)


class AdapterWatcher:
    def __init__(self, inbox: Inbox[AdapterReady], adapters: AdapterManager, store: Path | None = None,
                 store_check_s: float = 15.0, retry_s: float = 2.0):
        self.inbox, self.adapters, self.retry_s = inbox, adapters, retry_s
        self.store, self.store_check_s = (Path(store) if store is not None else None), store_check_s
        self._next_store_check = 0.0
        self._refused_store: set[tuple[int, str]] = set()  # store versions refused once: not tried on every check

    def catch_up(self, halt: threading.Event, poll_ms: int = 200) -> int | None:
        """Read the topic to its end, then the store; serve the newest valid version and return it (None if none)."""
        served = self._catch_up_topic(halt, poll_ms)
        from_store = self.check_store(halt)
        return from_store if from_store is not None else served

    def _catch_up_topic(self, halt: threading.Event, poll_ms: int) -> int | None:
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
            if self._apply(env.value, halt, env):
                log.info("caught up: %d adapter messages, serving version %d", len(seen), env.value.version)
                return env.value.version
        return None

    def check_store(self, halt: threading.Event) -> int | None:
        """Serve the store's newest announced version newer than the current one that passes its checks
        (a damaged newest version does not leave a restarted generator on `base`); returns it if loaded."""
        self._next_store_check = time.monotonic() + self.store_check_s
        if self.store is None:
            return None
        try:
            versions = announced_versions(self.store)
        except OSError as exc:  # a volume that went away: the topic still works; try again later
            log.warning("cannot read the adapter store %s: %s", self.store, exc)
            return None
        current = self.adapters.current_version
        VERSIONS_BEHIND.set(max(0, (versions[-1] if versions else 0) - max(current, 0)))
        for version in reversed(versions):
            if version <= current or halt.is_set():
                return None
            ready = read_manifest(self.store, version)
            if ready is None or (ready.version, ready.sha256) in self._refused_store:
                continue
            try:  # the record names its own version's folder (the same check as for the topic's messages)
                check_announced(self.store, ready, "generator")
            except NotAnnounced as exc:
                self._refused(ready, None, exc.reason)
                continue
            log.warning("the adapter store holds %s but odpo.adapters did not bring it (serving version %d): "
                        "loading it from the store", version_name(ready.version), current)
            STORE_CATCH_UPS.inc()
            if self._apply(ready, halt, None):
                VERSIONS_BEHIND.set(max(0, versions[-1] - version))
                return version
        return None

    def run(self, halt: threading.Event, poll_ms: int = 500) -> None:
        while not halt.is_set():
            for env in self.inbox.poll(timeout_ms=poll_ms):
                self._apply(env.value, halt, env)
            if time.monotonic() >= self._next_store_check:
                self.check_store(halt)
                self.forget_deleted()

    def forget_deleted(self) -> None:
        """Unload the names of versions retention deleted (generator/adapters.py says why only those)."""
        if self.store is None:
            return
        try:
            self.adapters.forget_deleted()
        except httpx.HTTPError as exc:  # vLLM restarting: the next check tries again
            log.warning("could not list vLLM's adapters: %s", exc)

    def _apply(self, ready: AdapterReady, halt: threading.Event, env: Envelope[AdapterReady] | None) -> bool:
        """Apply one version; a refused one is dead-lettered (when it came from the topic); an unreachable
        server is retried. A message from the topic is taken only if the store's announced record of its version
        is that message (core/adapter_store.py, `check_announced`): a forged one is dead-lettered."""
        if env is not None and self.store is not None and ready.version > self.adapters.current_version:
            try:
                check_announced(self.store, ready, "generator")
            except NotAnnounced as exc:
                if exc.stale:  # an old message of a version retention deleted (a compacted topic keeps it)
                    log.debug("skipping %s: %s", version_name(ready.version), exc.reason)
                else:
                    self.inbox.reject(env, f"not announced in the adapter store: {exc.reason}")
                return False
        while not halt.is_set():
            try:
                return self.adapters.apply(ready)
            except AdapterRejected as exc:
                self._refused(ready, env, exc.reason)
                return False
            except httpx.TransportError as exc:
                log.warning("vLLM unreachable while loading version %d (%s); retrying", ready.version, exc)
                halt.wait(self.retry_s)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop hot swaps; the message is kept in the DLQ
                log.exception("loading version %d failed", ready.version)
                self._refused(ready, env, f"internal error: {exc!r}")
                return False
        return False

    def _refused(self, ready: AdapterReady, env: Envelope[AdapterReady] | None, reason: str) -> None:
        if env is not None:
            self.inbox.reject(env, reason)
        else:  # read from the store: there is no Kafka record to dead-letter; the swap-failure metric counts it
            self._refused_store.add((ready.version, ready.sha256))
            log.error("the store's %s will not be served: %s", version_name(ready.version), reason)
