"""A consumer group's reader (core.bus.Inbox) across a memory-only broker's restart, on real Tansu.

- Killed with SIGKILL and started again empty on the same address: the new topic is read from its start.
  kafka-python keeps a partition's position across the rebalance and Tansu answers a fetch past a
  partition's end with nothing, so a reader left at the old position would skip the new topic's first
  records (the chaos run lost 11 pairs that way).
- A member kafka-python leaves "rebalancing" for good (its join completed while no poll awaited it) is
  replaced by a new consumer that resumes from the committed offsets.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from kafka import TopicPartition

from core.broker import EmbeddedBroker
from core.bus import Envelope, Inbox, group_stable, ensure_topics, make_producer, publish
from core.contracts import TOPIC_PREFERENCES, PreferencePair, PromptEvent, pair_id


def _pair(tag: str, i: int) -> PreferencePair:
    prompt = PromptEvent(id=f"{tag}-{i}", text=f"{tag} prompt {i}")
    return PreferencePair(id=pair_id(prompt.id, "a fine answer", "no", 0), prompt=prompt, chosen="a fine answer",
                          rejected="no", policy_version=0, judge="test")


def _send(bootstrap: str, tag: str, n: int) -> list[str]:
    producer = make_producer(bootstrap)  # its own producer: an idempotent one does not survive a broker restart
    try:
        pairs = [_pair(tag, i) for i in range(n)]
        for p in pairs:
            publish(producer, TOPIC_PREFERENCES, p.id, p, flush=False)
        producer.flush()
        return [p.id for p in pairs]
    finally:
        producer.close()


def _read(inbox: Inbox, want: int, timeout_s: float = 60) -> list:
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        try:
            got += inbox.poll(timeout_ms=500)
        except Exception:  # noqa: BLE001 - the broker is down for a moment: kafka-python reconnects
            time.sleep(0.5)
    return got


@pytest.fixture()
def private_broker(tmp_path):
    """A broker of this test's own (it is killed), odpo.preferences created, and the inboxes opened on it."""
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log").start()
    producer = make_producer(broker.bootstrap)
    inboxes: list[Inbox] = []

    def inbox(group_id: str, **kw) -> Inbox:
        inboxes.append(Inbox(broker.bootstrap, TOPIC_PREFERENCES, PreferencePair, "test", producer,
                             group_id=group_id, **kw))
        return inboxes[-1]

    try:
        ensure_topics(broker.bootstrap, [TOPIC_PREFERENCES])
        yield broker, inbox
    finally:
        for i in inboxes:
            i.close()
        producer.close()
        broker.stop()


def test_a_group_reader_reads_a_recreated_topic_from_its_start(private_broker):
    broker, open_inbox = private_broker
    inbox = open_inbox("test-group")
    before = _send(broker.bootstrap, "before", 6)
    got = _read(inbox, 6)
    assert [e.value.id for e in got] == before
    inbox.commit(got)
    assert inbox.rewinds == 0
    assert list(inbox.commit_positions().values()) == [6]

    os.kill(broker.pid, signal.SIGKILL)
    broker.start()  # the same port, empty
    ensure_topics(broker.bootstrap, [TOPIC_PREFERENCES])
    # Fewer records than the old position: a reader left at offset 6 would get none of them.
    after = _send(broker.bootstrap, "after", 3)
    got = _read(inbox, 3)
    assert sorted(e.value.id for e in got) == sorted(after), "every record of the new topic, once"
    # (A restarted Tansu may create the topic on a client's first request, with several partitions.)
    by_partition: dict[int, list[int]] = {}
    for e in got:
        by_partition.setdefault(e.partition, []).append(e.offset)
    assert all(offsets == list(range(len(offsets))) for offsets in by_partition.values()), by_partition
    assert inbox.rewinds == 1

    # An envelope read before the restart (offset 5 of the old topic) never moves a commit past the reader.
    first = got[0]
    tp = TopicPartition(TOPIC_PREFERENCES, first.partition)
    held = len(by_partition[first.partition])
    stale = Envelope(TOPIC_PREFERENCES, first.partition, 5, None, _pair("old", 0))
    assert inbox.commit_positions([stale])[tp] == held < 5
    assert inbox.commit_positions([first, stale])[tp] == first.offset == 0


def test_a_member_stuck_outside_a_stable_group_joins_again_from_the_committed_offsets(private_broker):
    from kafka.structs import MemberState

    broker, open_inbox = private_broker
    inbox = open_inbox("stuck-group", stuck_s=15.0)  # a join takes 3-5 s; a replaced member may wait out the old one
    sent = _send(broker.bootstrap, "s", 3)
    got = _read(inbox, 3)
    assert [e.value.id for e in got] == sent
    inbox.commit(got[:2])  # the third is read, not done
    assert group_stable(inbox.consumer) and inbox.rejoins == 0
    stuck = inbox.consumer
    # The state kafka-python 3.0.12 is left in when a join completes outside a poll: joined, nothing to
    # rejoin, but never marked stable, so every commit fails with RebalanceInProgressError.
    stuck._coordinator.state = MemberState.REBALANCING
    again = _read(inbox, 1, timeout_s=60)
    assert inbox.rejoins == 1 and inbox.consumer is not stuck
    assert [e.value.id for e in again] == sent[2:], "the new member resumes at the first record not committed"
    inbox.commit(again)
    assert list(inbox.commit_positions().values()) == [3]
