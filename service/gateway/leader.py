"""Which gateway replica leads (runs the promotion gate), elected by Kafka itself.

Every replica joins the consumer group named after `leader_topic` (dots as
dashes: `odpo-gateway-leader`) on that one-partition topic; the member the
group assigns the partition to is the candidate leader. A member that dies
stops heartbeating, and after the session timeout the group gives the
partition to another one. The consumer is polled in its own thread (the
rebalance callbacks run in `poll`); nothing is ever read from the topic or
committed.

Being assigned the partition is not yet leading: the control plane
(service/gateway/control.py) first claims a new epoch on the control topic
and reads it back, which fences a paused ex-leader and means it has read the
shared state to its end.

Measured on Tansu (kafka-python 3.0): a member's first join takes 3-5 s; after
a kill -9 of the owner the partition moves after the session timeout plus
about 5 s; a SIGSTOPped owner loses it the same way and, resumed, is told
(revoked) within a second; after a broker restart every member re-joins by
itself within a few seconds (the generation starts again at 0). As a guard
against the "rebalance in progress" state a consumer of the trainer was once
stuck in after a broker restart, a member that has not been in a stable
group for `stuck_s` is closed and joins again with a new consumer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition

from core.bus import ensure_topics, group_stable

log = logging.getLogger(__name__)


def group_of(leader_topic: str) -> str:
    return leader_topic.replace(".", "-")


class LeaderElection:
    """Holds this replica's membership in the leader group; `elected` says whether it owns the partition."""

    def __init__(self, bootstrap: str, topic: str, client_id: str, session_timeout_s: float,
                 on_change: Callable[[bool], None], stuck_s: float = 60.0):
        self.bootstrap, self.topic, self.client_id = bootstrap, topic, client_id
        self.group = group_of(topic)
        self.session_timeout_ms = int(session_timeout_s * 1000)
        self.on_change = on_change
        self.stuck_s = stuck_s
        self._owned = False
        self._revoked_at: float | None = None  # set while a rebalance is under way (revoked, not yet assigned)
        self._consumer: KafkaConsumer | None = None
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="odpo-gateway-leader", daemon=True)

    @property
    def elected(self) -> bool:
        """True while this member owns the partition and its session has not expired (a member cut off from the
        broker stops leading after the session timeout, as the group would have given the partition away)."""
        if not self._owned:
            return False
        consumer = self._consumer
        try:
            return not consumer._coordinator.heartbeat.session_timeout_expired()
        except AttributeError:  # another kafka-python: trust the callbacks
            return consumer is not None

    def in_rebalance(self, max_s: float) -> bool:
        """True while the group rebalances (every member gave up its partitions and waits for the new
        assignment), for at most `max_s`: on Tansu every member's join waits about 5 s, so a leader that only
        saw another replica join gets its partition back after that pause."""
        revoked = self._revoked_at
        return revoked is not None and time.monotonic() - revoked < max_s

    def start(self) -> LeaderElection:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Leave the group (the others rebalance at once). A daemon thread stuck reaching a down broker (30 s) is
        not waited for beyond `timeout_s`: it ends with the process."""
        self._halt.set()
        self._thread.join(timeout=timeout_s)

    # -- the thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                self._member()
            except Exception as exc:  # noqa: BLE001 - kafka-python raises several kinds; join again later
                log.warning("leader election: %s: %s; joining again in 5 s", type(exc).__name__, exc)
            self._set_owned(False)
            self._halt.wait(5)

    def _member(self) -> None:
        """One consumer's life in the group: until stopped, or stuck outside a stable group for `stuck_s`."""
        ensure_topics(self.bootstrap, [self.topic])
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, client_id=self.client_id,
            enable_auto_commit=False, session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(500, self.session_timeout_ms // 5),
            max_poll_interval_ms=max(30_000, 3 * self.session_timeout_ms))
        self._consumer = consumer
        consumer.subscribe([self.topic], listener=_Listener(self))
        stable_at = next_topic_check = time.monotonic()
        try:
            while not self._halt.is_set():
                consumer.poll(timeout_ms=500)
                if consumer.assignment():
                    consumer.pause(*consumer.assignment())  # membership only: nothing to read
                elif time.monotonic() >= next_topic_check:  # a broker that restarted empty: no topic, no leader
                    next_topic_check = time.monotonic() + 30
                    if not consumer.partitions_for_topic(self.topic):
                        ensure_topics(self.bootstrap, [self.topic])
                if group_stable(consumer):
                    stable_at = time.monotonic()
                elif time.monotonic() - stable_at > self.stuck_s:
                    log.warning("leader election: not in a stable group for %.0f s; joining with a new consumer",
                                self.stuck_s)
                    return
        finally:
            self._revoked_at = None
            self._set_owned(False)
            with contextlib.suppress(Exception):  # leaves the group, so the others rebalance at once
                consumer.close()

    def _set_owned(self, owned: bool) -> None:
        if owned == self._owned:
            return
        self._owned = owned
        log.warning("leader election: %s the partition of %s (group %s)", "owns" if owned else "gave up",
                    self.topic, self.group)
        self.on_change(owned)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, election: LeaderElection):
        self.election = election

    def on_partitions_revoked(self, revoked):
        self.election._revoked_at = time.monotonic()
        self.election._set_owned(False)

    def on_partitions_assigned(self, assigned):
        self.election._revoked_at = None
        self.election._set_owned(TopicPartition(self.election.topic, 0) in set(assigned))
