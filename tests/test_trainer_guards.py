"""The trainer loop on the real broker with a tiny local Llama: a poisoned batch is skipped and counted, the
adapter it publishes is finite; at start the newest version is always announced again (the topic may have lost
it), its manifest written first when the store has none, and one never announced (a crash) is counted."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace

import torch
from kafka import TopicPartition
from safetensors.torch import load_file

from core.adapter_store import (
    adapter_digest,
    announced_versions,
    mark_published,
    newest_ready,
    published_version,
    published_versions,
)
from core.bus import Inbox, publish
from core.contracts import (
    TOPIC_ADAPTERS,
    TOPIC_PREFERENCES,
    AdapterReady,
    PreferencePair,
)
from core.settings import CommonSettings, TrainerSettings
from tests.test_trainer_crash import random_pairs
from tests.test_trainer_service import end_offset, metric, read_from, start_group_at_end
from trainer.recipe import Trainer
from trainer.service import TrainerLoop


def kafka_loop(broker, producer, group_id, tiny_model_dir, store, **settings):
    """A trainer loop with its own Kafka inbox on `broker` (group `group_id`), storing in `store`."""
    common = CommonSettings(bootstrap_servers=broker.bootstrap, store_dir=store, base_model=tiny_model_dir)
    ts = TrainerSettings(group_id=group_id, max_staleness=100, **settings)
    trainer = Trainer.open(tiny_model_dir, ts, store)
    inbox = Inbox(broker.bootstrap, TOPIC_PREFERENCES, PreferencePair, "trainer", producer, group_id=group_id)
    return TrainerLoop(trainer, inbox, producer, common, ts, threading.Event())


def _adapters(bootstrap, start, version, count=1):
    recs = read_from(bootstrap, TOPIC_ADAPTERS, start,
                     lambda rs: sum(AdapterReady.from_bytes(r.value).version == version for r in rs) >= count)
    return [a for a in (AdapterReady.from_bytes(r.value) for r in recs) if a.version == version]


def test_poisoned_logits_skip_the_step_count_it_and_publish_a_finite_adapter(
        broker, producer, group_id, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    start_group_at_end(broker.bootstrap, group_id)
    loop = kafka_loop(broker, producer, group_id, tiny_model_dir, store, window_pairs=4, steps_per_window=3)
    head = loop.trainer.policy.model.get_base_model().get_output_embeddings()
    calls = {"n": 0}

    def poison_first_step(module, args, output):  # inf logits in the first training forward (not the reference)
        if not module.training:
            return output
        calls["n"] += 1
        return output * float("inf") if calls["n"] == 1 else output

    hook = head.register_forward_hook(poison_first_step)
    adapters_start = end_offset(broker.bootstrap, TopicPartition(TOPIC_ADAPTERS, 0))
    skips_before, published_before = metric("odpo_trainer_nan_skips_total"), \
        metric("odpo_trainer_windows_total", outcome="published")
    try:
        for p in random_pairs(4, uuid.uuid4().hex[:6]):
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p)
        deadline = time.monotonic() + 120
        while loop.trainer.version == 0 and time.monotonic() < deadline:
            loop.tick(timeout_ms=300)
    finally:
        hook.remove()
        loop.inbox.close()
    assert loop.trainer.version == 1 and calls["n"] > 1
    assert metric("odpo_trainer_nan_skips_total") - skips_before == 1
    assert metric("odpo_trainer_windows_total", outcome="published") - published_before == 1
    ready = _adapters(broker.bootstrap, adapters_start, 1)
    assert len(ready) == 1 and ready[0].metrics.steps == 2 and ready[0].metrics.model_dump()["skipped"] == 1
    weights = load_file(store / "policy-v1" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for n, w in weights.items() if "lora_B" in n)  # the other two steps trained


def test_the_newest_version_is_announced_at_every_start_and_counted_only_when_it_never_went_out(
        broker, producer, group_id, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    trainer = Trainer.open(tiny_model_dir, TrainerSettings(steps_per_window=1))
    pairs = [trainer.tokenize(p) for p in random_pairs(2, uuid.uuid4().hex[:6])]
    for _ in range(2):  # v1 announced; v2 renamed into place, then the trainer "died" before announcing it
        result = trainer.train_window(pairs)
        trainer.publish_version(store, [p.pair_id for p in pairs], result)
        pairs = [replace(p, pair_id=p.pair_id + "x") for p in pairs]
        if trainer.version == 1:
            mark_published(store, 1)
    # no manifests at all: a store from before them (or a kill between the rename and the manifest)
    assert published_versions(store) == [1, 2] and published_version(store) == 1 and newest_ready(store) is None
    start = end_offset(broker.bootstrap, TopicPartition(TOPIC_ADAPTERS, 0))
    before = metric("odpo_trainer_adapters_republished_total")
    loop = kafka_loop(broker, producer, group_id, tiny_model_dir, store)
    try:
        assert loop.trainer.version == 2
        first = loop.announce_newest()
        assert newest_ready(store) == first and announced_versions(store) == [2]  # the manifest came first
        assert metric("odpo_trainer_adapters_republished_total") - before == 1
        again = loop.announce_newest()  # the next start: announced again (the topic may have lost it) ...
        assert again == first
        assert metric("odpo_trainer_adapters_republished_total") - before == 1  # ... but it had gone out before
    finally:
        loop.inbox.close()
    ready = _adapters(broker.bootstrap, start, 2, count=2)
    assert len(ready) == 2 and ready[0] == ready[1] and ready[0].parent_version == 1 and ready[0].pairs_trained == 4
    assert ready[0].sha256 == adapter_digest(store / "policy-v2") and ready[0].path == "policy-v2"
    assert published_version(store) == 2


def test_a_fresh_store_announces_nothing(broker, producer, group_id, tiny_model_dir, tmp_path):
    loop = kafka_loop(broker, producer, group_id, tiny_model_dir, tmp_path / "store")
    try:
        assert loop.announce_newest() is None and newest_ready(tmp_path / "store") is None
    finally:
        loop.inbox.close()
