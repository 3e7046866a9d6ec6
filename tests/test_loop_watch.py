"""Stale pairs are loud in `odpo up`: the watcher keeps a window of the recent sampled pairs and says, once per
episode, when most of them are too old to be trained. Records are fed to it directly (no broker)."""

from __future__ import annotations

import pytest

from service import loop_watch
from core.adapter_store import write_manifest
from core.contracts import (
    DATASET_JUDGE,
    TOPIC_ADAPTERS,
    TOPIC_CANDIDATES,
    TOPIC_PREFERENCES,
    AdapterReady,
    PreferencePair,
    PromptEvent,
    TrainMetrics,
)
from service.loop_watch import LoopWatcher, StalePairs
from service.up_view import LOUD, EventLog, progress_table, summary


class NoTail:
    def poll(self, timeout_ms: int = 500) -> list:
        return []

    def rewind(self) -> None:
        pass

    def close(self) -> None:
        pass


def _pair(i: int, version: int, judge: str = "rules") -> bytes:
    return PreferencePair(id=f"pair-{i}-{version}-{judge}", prompt=PromptEvent(id=f"p{i}", text="say hi"),
                          chosen="hi there", rejected="no", policy_version=version, judge=judge).to_bytes()


def _ready(v: int) -> AdapterReady:
    return AdapterReady(version=v, path=f"policy-v{v}", sha256="0" * 64, base_model="m", parent_version=v - 1,
                        pairs_trained=16, metrics=TrainMetrics(loss=0.6, reward_margin=0.1, reward_accuracy=0.7,
                                                               steps=4))


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_watch, "STORE_POLL_S", 0.0)
    return tmp_path / "store"


def _publish_in_store(store, version: int) -> None:
    (store / f"policy-v{version}").mkdir(parents=True)
    (store / f"policy-v{version}" / "adapter_model.safetensors").write_bytes(b"x")
    write_manifest(store, _ready(version))


def test_most_recent_pairs_stale_is_said_once_per_episode(store):
    watcher = LoopWatcher("unused:1", store=store, max_staleness=4, tail=NoTail())
    events = EventLog()
    for i in range(30):
        watcher.count(TOPIC_PREFERENCES, _pair(i, 0))
    c = watcher.snapshot()
    assert c.pairs == 30 and not c.stale.alarm and events.lines(c, None) == [], "at v0, v0 pairs are fresh"

    # The trainer resumed at v10 (in the store only: the new broker's odpo.adapters is empty) and the generator
    # still samples with base: every pair is dropped.
    _publish_in_store(store, 10)
    for i in range(30, 60):
        watcher.count(TOPIC_PREFERENCES, _pair(i, 0))
    c = watcher.snapshot()
    assert (c.stale.alarm, c.stale.stale, c.stale.window, c.stale.newest, c.stale.sampled_by) == (True, 30, 30, 10, 0)
    lines = events.lines(c, None)
    assert lines == [LOUD + "most recent pairs are stale: 30 of the last 30 were sampled by v0 while the trainer "
                            "is at v10 (max staleness 4) — the generator is behind (pairs are dropped, not trained)"]
    assert events.lines(watcher.snapshot(), None) == [], "once per episode"
    assert "most recent pairs are stale" in _text(progress_table(c, None, 60, 1.0, 10.0, None, {"trainer": 1}))

    for i in range(30):  # dataset pairs are off-policy by nature: they neither raise nor clear the alarm
        watcher.count(TOPIC_PREFERENCES, _pair(i, 0, judge=DATASET_JUDGE))
    assert watcher.snapshot().stale.window == 30 and watcher.snapshot().stale.stale == 30

    for i in range(20):  # the generator caught up
        watcher.count(TOPIC_PREFERENCES, _pair(100 + i, 10))
    c = watcher.snapshot()
    assert not c.stale.alarm and c.stale.stale == 10
    assert events.lines(c, None) == ["recent pairs are fresh again: 10 of the last 30 were too old to be trained"]

    watcher.count(TOPIC_ADAPTERS, _ready(16).to_bytes())  # the topic's fast path
    watcher.count(TOPIC_ADAPTERS, _ready(16).to_bytes())  # a re-announcement is one version, not two
    c = watcher.snapshot()
    assert not c.stale.alarm, "pairs that arrived before v16 were trainable then: a new version alone is no alarm"
    assert c.stale.newest == 16 and [a.version for a in c.adapters] == [16]
    for i in range(30):  # the generator stays at v10 (16 - 4 = 12 is the oldest trainable)
        watcher.count(TOPIC_PREFERENCES, _pair(200 + i, 10))
    c = watcher.snapshot()
    assert c.stale.alarm and c.stale.stale == 30
    assert events.lines(c, None)[0].startswith(LOUD + "most recent pairs are stale: 30 of the last 30 were sampled "
                                               "by v10 while the trainer is at v16")
    s = summary(c, None, sent=100, elapsed=60.0, restarts={"trainer": 1, "broker": 0}, resumed_from=10,
                dropped_stale=57)
    assert s["stale"]["episodes"] == 2 and s["stale"]["pairs_dropped_by_trainer"] == 57
    assert s["stale"]["pairs_seen_stale"] == 60 and s["restarts"] == {"trainer": 1, "broker": 0}
    assert s["resumed_from"] == 10


def test_a_few_stale_pairs_are_not_an_alarm():
    stale = StalePairs(max_staleness=2, window=30, min_pairs=10)
    stale.published(5)
    for _ in range(9):
        stale.pair(0, "rules")
    assert not stale.state().alarm, "fewer than min_pairs pairs say nothing yet"
    for _ in range(12):
        stale.pair(4, "rules")
    st = stale.state()
    assert (st.alarm, st.stale, st.window) == (False, 9, 21), "9 of 21 is not most"
    stale.pair(3, "rules")  # 5 - 3 = 2: still trained
    assert stale.state().stale == 9
    stale.published(7)
    assert stale.state().stale == 9, "judged when they arrived, as the trainer judges them"


def test_counts(store):
    watcher = LoopWatcher("unused:1", store=store, tail=NoTail())
    watcher.count(TOPIC_CANDIDATES, b"anything")
    watcher.count(TOPIC_PREFERENCES, b"not a pair")  # counted, but says nothing about staleness
    c = watcher.snapshot()
    assert (c.candidate_sets, c.pairs, c.stale.window) == (1, 1, 0)


def _text(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()
