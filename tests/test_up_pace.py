"""odpo up's back-pressure: the feed holds while the trainer's group lags `limit` pairs behind odpo.preferences."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, start_http_server
from kafka.structs import OffsetAndMetadata

from core.broker import free_port
from core.contracts import TOPIC_PREFERENCES
from service.up_pace import TrainerBacklog


def _publish(producer, group_id: str, n: int) -> None:
    """n pairs' worth of records, one batch each (Tansu's end offset is the last batch's first offset + 1)."""
    for i in range(n):
        producer.send(TOPIC_PREFERENCES, key=f"{group_id}-{i}".encode(), value=b"{}")
        producer.flush()


def test_the_feed_holds_while_the_trainer_lags_and_goes_on_once_it_commits(broker, producer, group_id):
    _publish(producer, group_id, 3)
    tp = TopicPartition(TOPIC_PREFERENCES, 0)
    trainer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group_id, enable_auto_commit=False)
    pace = TrainerBacklog(broker.bootstrap, group_id, limit=2, every_s=0)
    try:
        end = trainer.end_offsets([tp])[tp]
        assert pace.refresh() == end >= 3  # the group never committed: everything on the topic waits for it
        assert pace.full()
        trainer.assign([tp])
        trainer.commit({tp: OffsetAndMetadata(end - 1, "", -1)})  # the trainer trained all but the last pair
        assert pace.refresh() == 1 and not pace.full()
        assert pace.held_s > 0
        assert not TrainerBacklog(broker.bootstrap, group_id, limit=0, every_s=0).full()  # 0: never holds
    finally:
        trainer.close()
        pace.close()


def test_an_unreadable_lag_never_holds_the_feed():
    pace = TrainerBacklog("127.0.0.1:9", "odpo-trainer", limit=1, every_s=0.1).start()  # nothing listens there
    try:
        assert pace.lag is None and not pace.full()  # read in its own thread: the caller never waits for it
        time.sleep(1)
        assert pace.lag is None and not pace.full()
    finally:
        pace.close()


def test_a_hold_ends_when_the_trainer_stops_committing(broker, producer, group_id):
    """Pairs the trainer dropped behind a part-filled window count in the lag: the hold must not wait for them."""
    _publish(producer, group_id, 3)
    pace = TrainerBacklog(broker.bootstrap, group_id, limit=2, every_s=0, stall_s=1.0)
    try:
        assert pace.refresh() >= 3 and pace.full()
        time.sleep(1.2)
        assert pace.refresh() >= 3 and not pace.full()  # no commit for stall_s: the feed goes on
    finally:
        pace.close()


def test_the_hold_waits_longer_for_a_trainer_whose_windows_are_slow(broker, producer, group_id):
    """stall_s is a floor: a trainer whose windows take longer on this machine gets three times its slowest."""
    _publish(producer, group_id, 4)
    tp = TopicPartition(TOPIC_PREFERENCES, 0)
    trainer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group_id, enable_auto_commit=False)
    pace = TrainerBacklog(broker.bootstrap, group_id, limit=2, every_s=0, stall_s=0.5)
    try:
        assert pace.refresh() >= 4 and pace.full() and pace.patience_s == 0.5
        time.sleep(0.4)
        trainer.assign([tp])
        trainer.commit({tp: OffsetAndMetadata(1, "", -1)})  # one slow window: ~0.4 s between commits
        assert pace.refresh() >= 2 and pace.full()
        assert 1.2 <= pace.patience_s < 10
        time.sleep(0.8)  # past stall_s, within three slow windows: still held
        assert pace.refresh() >= 2 and pace.full()
        time.sleep(pace.patience_s)
        assert not pace.full()  # the trainer stopped committing: the feed goes on
    finally:
        trainer.close()
        pace.close()


def test_pairs_the_trainer_dropped_do_not_hold_the_feed(broker, producer, group_id):
    """The trainer commits past dropped pairs only once its part-filled window is trained: those pairs count in
    the lag but will never be trained, so what its /metrics says it dropped since its offsets moved comes off.
    A trainer that answers is waited for however long its window takes."""
    registry = CollectorRegistry()
    dropped = Counter("odpo_trainer_pairs_dropped", "Pairs not trained, by reason.", ["reason"], registry=registry)
    dropped.labels("duplicate").inc(0)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    _publish(producer, group_id, 3)
    pace = TrainerBacklog(broker.bootstrap, group_id, limit=2, every_s=0, stall_s=0.5,
                          trainer_metrics=f"http://127.0.0.1:{port}/metrics")
    try:
        assert pace.refresh() >= 3 and pace.pending == pace.lag and pace.full()
        time.sleep(0.7)  # past stall_s without a commit: a trainer whose /metrics answer is busy, not stuck
        assert pace.refresh() >= 3 and pace.trainer_seen and pace.full()
        dropped.labels("stale").inc(pace.lag - 1)  # all but one were stale: one pair waits in a window
        pace.refresh()
        assert pace.pending == 1 and not pace.full()
        assert TrainerBacklog(broker.bootstrap, group_id, limit=2, every_s=0,  # its /metrics unreadable: the lag
                              trainer_metrics="http://127.0.0.1:9/metrics").refresh() >= 3
    finally:
        pace.close()
        server.shutdown()
        thread.join(timeout=5)
