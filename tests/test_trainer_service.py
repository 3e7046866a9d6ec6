"""The trainer process on the real broker: pairs in, policy-v1 out, bad input to the DLQ, offsets committed,
and a restart on the same store resumes without training a replayed pair twice."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client import REGISTRY
from transformers import AutoTokenizer

from core.adapter_store import adapter_digest, published_versions
from core.bus import GROUP_SETTINGS, publish
from core.contracts import (DATASET_JUDGE, TOPIC_ADAPTERS, TOPIC_DLQ, TOPIC_PREFERENCES, AdapterReady,
                               DeadLetter)
from core.settings import CommonSettings, TrainerSettings
from tests.test_trainer_train import make_pairs
from trainer.checkpoint import STATE_FILE
from trainer.service import run

TIMEOUT_S = 120
PREFS = TopicPartition(TOPIC_PREFERENCES, 0)


def end_offset(bootstrap: str, tp: TopicPartition) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        return consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()


def start_group_at_end(bootstrap: str, group: str) -> int:
    """Other tests share odpo.preferences: let this group begin after what is already there; returns the offset
    committed. (Tansu answers the last batch's base offset + 1 as the end after a multi-record batch, so the rest
    of that batch is read first.)"""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.assign([PREFS])
        consumer.seek(PREFS, consumer.end_offsets([PREFS])[PREFS])
        while consumer.poll(timeout_ms=1000):
            pass
        start = consumer.position(PREFS)
        consumer.commit({PREFS: OffsetAndMetadata(start, "", -1)})
        return start
    finally:
        consumer.close()


def read_from(bootstrap: str, topic: str, start: int, done, timeout_s: float = TIMEOUT_S) -> list:
    """Records of `topic` from offset `start` on, once `done(records)` holds or the time is up."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, start)
    found: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while not done(found) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                found.extend(records)
    finally:
        consumer.close()
    return found


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Running:
    """`trainer.service.run` in a thread, stopped and joined on exit."""

    def __init__(self, common: CommonSettings, settings: TrainerSettings):
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(common, settings), daemon=True)

    def _run(self, common, settings):
        try:
            run(common, settings, self.stop)
        except BaseException as exc:  # noqa: BLE001 -- surfaced by the test
            self.errors.append(exc)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=TIMEOUT_S)
        assert not self.thread.is_alive(), "the trainer did not stop"
        assert not self.errors, self.errors


def _adapters(bootstrap, start, version):
    recs = read_from(bootstrap, TOPIC_ADAPTERS, start,
                     lambda rs: any(AdapterReady.from_bytes(r.value).version == version for r in rs))
    return [AdapterReady.from_bytes(r.value) for r in recs]


@pytest.fixture()
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_trainer_publishes_commits_dead_letters_and_resumes(broker, producer, group_id, model_dir, tok, tmp_path):
    bootstrap, store = broker.bootstrap, tmp_path / "store"
    common = CommonSettings(bootstrap_servers=bootstrap, store_dir=store, base_model=model_dir)
    settings = TrainerSettings(window_pairs=4, steps_per_window=2, batch_pairs=4, group_id=group_id)
    start_group_at_end(bootstrap, group_id)
    tag = uuid.uuid4().hex[:6]
    pairs = make_pairs(tok, 4, tag=tag)
    adapters_start = end_offset(bootstrap, TopicPartition(TOPIC_ADAPTERS, 0))
    dlq_start = end_offset(bootstrap, TopicPartition(TOPIC_DLQ, 0))
    dup_before = metric("odpo_trainer_pairs_dropped_total", reason="duplicate")
    trained_before = metric("odpo_trainer_pairs_trained_total")

    with Running(common, settings):
        for p in pairs[:2]:
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p)
        bad = producer.send(TOPIC_PREFERENCES, key=b"bad", value=b'{"id": "x", "prompt": nope').get(timeout=30)
        for p in pairs[2:]:
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p)
        ready = [a for a in _adapters(bootstrap, adapters_start, 1) if a.version == 1]
        assert len(ready) == 1, "no AdapterReady for version 1"
        deadline = time.monotonic() + 30  # the commit follows the publish
        while (committed := _committed(bootstrap, group_id)) != bad.offset + 3 and time.monotonic() < deadline:
            time.sleep(0.2)
    end = end_offset(bootstrap, PREFS)

    msg = ready[0]
    assert (msg.path, msg.parent_version, msg.pairs_trained, msg.metrics.steps) == ("policy-v1", 0, 4, 2)
    assert msg.base_model == "SmolLM2-135M-Instruct"
    assert (store / "policy-v1").is_dir() and published_versions(store) == [1]
    assert msg.sha256 == adapter_digest(store / "policy-v1")
    assert msg.metrics.loss < 0.6932 and msg.metrics.reward_accuracy >= 0.5

    letters = [DeadLetter.from_bytes(r.value) for r in
               read_from(bootstrap, TOPIC_DLQ, dlq_start, lambda rs: False, timeout_s=2)]
    mine = [d for d in letters if d.source_topic == TOPIC_PREFERENCES and d.offset == bad.offset]
    assert len(mine) == 1 and mine[0].component == "trainer" and "PreferencePair" in mine[0].error

    assert committed == end == bad.offset + 3  # the window and the dead letter between its pairs
    assert metric("odpo_trainer_pairs_trained_total") - trained_before == 4
    # A new member of the group sees none of it again: the first record it gets is a replay sent now.
    replay = producer.send(TOPIC_PREFERENCES, key=pairs[0].prompt.id.encode(), value=pairs[0].to_bytes()).get(30)
    seen = _group_read_until(bootstrap, group_id, replay.offset)
    assert [r.offset for r in seen] == [replay.offset]

    # Restart on the same store: resumes at v1; replayed pairs are duplicates, new ones make v2;
    # with max_staleness 0 a new pair from v0 is stale, and one from v5 comes from a lineage it never made;
    # a pair loaded from a dataset carries v0 too but was sampled by no version, so it is never stale.
    more = make_pairs(tok, 5, tag=tag + "b", policy_version=1)[2:]
    more.append(make_pairs(tok, 1, tag=tag + "d", policy_version=0)[0].model_copy(update={"judge": DATASET_JUDGE}))
    stale = make_pairs(tok, 1, tag=tag + "s", policy_version=0)[0]
    future = make_pairs(tok, 1, tag=tag + "f", policy_version=5)[0]
    drops_before = {r: metric("odpo_trainer_pairs_dropped_total", reason=r) for r in ("stale", "future_version")}
    adapters_start = end_offset(bootstrap, TopicPartition(TOPIC_ADAPTERS, 0))
    with Running(common, settings.model_copy(update={"max_staleness": 0})):
        for p in pairs[:2] + [stale, future] + pairs[2:] + more:
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p)
        ready2 = [a for a in _adapters(bootstrap, adapters_start, 2) if a.version == 2]
    assert len(ready2) == 1 and ready2[0].parent_version == 1 and ready2[0].pairs_trained == 8
    assert ready2[0].sha256 == adapter_digest(store / "policy-v2")
    state = json.loads((store / "policy-v2" / STATE_FILE).read_text())
    assert sorted(state["trained_ids"]) == sorted(p.id for p in pairs + more)
    assert metric("odpo_trainer_pairs_dropped_total", reason="duplicate") - dup_before == 5  # 4 + the replay
    assert metric("odpo_trainer_policy_version") == 2
    for reason, before in drops_before.items():
        assert metric("odpo_trainer_pairs_dropped_total", reason=reason) - before == 1


def _committed(bootstrap: str, group: str) -> int | None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(PREFS)
    finally:
        consumer.close()


def _group_read_until(bootstrap: str, group: str, offset: int) -> list:
    """Join `group` as a new member and read from its committed offset until `offset` arrives (no commit)."""
    consumer = KafkaConsumer(TOPIC_PREFERENCES, bootstrap_servers=bootstrap, group_id=group,
                             enable_auto_commit=False, auto_offset_reset="earliest", **GROUP_SETTINGS)
    found: list = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not any(r.offset >= offset for r in found) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                found.extend(records)
    finally:
        consumer.close()
    return found


def test_loop_keeps_its_group_through_a_slow_window_and_dead_letters_a_nonfinite_one(
        broker, producer, group_id, model_dir, tok, tmp_path):
    import torch

    from core.bus import Inbox
    from core.contracts import PreferencePair
    from trainer.recipe import Trainer
    from trainer.service import TrainerLoop

    bootstrap, store = broker.bootstrap, tmp_path / "store"
    common = CommonSettings(bootstrap_servers=bootstrap, store_dir=store, base_model=model_dir)
    settings = TrainerSettings(window_pairs=4, steps_per_window=2, batch_pairs=4, group_id=group_id)
    start_group_at_end(bootstrap, group_id)
    trainer = Trainer.open(model_dir, settings, store)
    # A window longer than the group's max poll interval (10 s): a consumer that stopped polling
    # for that long would be thrown out of the group and its commit would fail.
    slow = trainer.policy.model.get_base_model().get_decoder().register_forward_pre_hook(lambda m, a: time.sleep(4))
    inbox = Inbox(bootstrap, TOPIC_PREFERENCES, PreferencePair, "trainer", producer, group_id=group_id)
    loop = TrainerLoop(trainer, inbox, producer, common, settings, threading.Event())
    dlq_start = end_offset(bootstrap, TopicPartition(TOPIC_DLQ, 0))
    tag = uuid.uuid4().hex[:6]
    window_s_before = metric("odpo_trainer_window_seconds_sum")
    try:
        for p in make_pairs(tok, 4, tag=tag):
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p)
        end = end_offset(bootstrap, PREFS)
        deadline = time.monotonic() + TIMEOUT_S
        while trainer.version == 0 and time.monotonic() < deadline:
            loop.tick(timeout_ms=300)
        slow.remove()
        assert trainer.version == 1
        assert metric("odpo_trainer_window_seconds_sum") - window_s_before >= 12
        assert _committed(bootstrap, group_id) == end  # committed by that very window, no later turn needed

        with torch.no_grad():  # poison the adapter: every step of the next window is non-finite
            next(p for n, p in trainer.policy.model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
        nonfinite_before = metric("odpo_trainer_windows_total", outcome="nonfinite")
        bad_pairs = make_pairs(tok, 4, tag=tag + "n", policy_version=1)
        for p in bad_pairs:
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p)
        end = end_offset(bootstrap, PREFS)
        deadline = time.monotonic() + TIMEOUT_S
        while metric("odpo_trainer_windows_total", outcome="nonfinite") == nonfinite_before \
                and time.monotonic() < deadline:
            loop.tick(timeout_ms=300)
        assert _committed(bootstrap, group_id) == end
    finally:
        inbox.close()
    assert trainer.version == 1 and published_versions(store) == [1]  # nothing non-finite was published
    letters = [DeadLetter.from_bytes(r.value) for r in read_from(bootstrap, TOPIC_DLQ, dlq_start,
                                                                 lambda rs: len(rs) >= 4, timeout_s=10)]
    not_trained = [d for d in letters if d.component == "trainer" and "not trained" in d.error]
    assert sorted(PreferencePair.from_bytes(d.payload.encode()).id for d in not_trained) == \
        sorted(p.id for p in bad_pairs)
