"""Resume bookkeeping of `odpo up` (no processes): the prompt feeder's position survives in feed.json and a
resumed run continues after it; the outstanding count starts afresh when the broker restarts (the prompts in it
are gone) or a send fails; a run folder with versions is resumed and `--rounds N` then means N more versions."""

from __future__ import annotations

import json

from kafka.errors import KafkaError
from kafka.future import Future

from core.adapter_store import write_manifest
from core.contracts import AdapterReady, PromptEvent, TrainMetrics
from service.registry.book import VersionBook
from service.loop_watch import LoopCounts
from service.prompt_feed import PromptFeeder, load_position
from service.up import earlier_run, stop_version, store_version
from service.up_view import EventLog, decided_through

PROMPTS = [PromptEvent(id=f"p{i}", text=f"prompt {i}") for i in range(3)]


class FakeProducer:
    def __init__(self, fail: bool = False):
        self.sent: list[str] = []
        self.fail, self.closed = fail, False

    def send(self, topic, key, value, headers=None, **_):  # core.bus.send adds the signature header
        f = Future()
        if self.fail:
            f.failure(KafkaError("broker away"))
        else:
            self.sent.append(key.decode())
            f.success(None)
        return f

    def flush(self, timeout=None):
        pass

    def close(self, timeout=None):
        self.closed = True


def test_backlog_and_reset_after_a_broker_restart():
    producers = []

    def make():
        producers.append(FakeProducer())
        return producers[-1]

    feeder = PromptFeeder(make, PROMPTS, backlog=4)
    assert feeder.top_up(done=0) == 4 and producers[0].sent == ["p0", "p1", "p2", "p0-e1"]
    assert feeder.top_up(done=0) == 0, "the backlog is full"
    assert feeder.top_up(done=2) == 2 and feeder.outstanding(done=2) == 4

    # The broker restarted: the 4 prompts waiting in it are gone; without a reset the feeder would wait for
    # them forever (outstanding stays 4, nothing is sent, the loop stalls).
    assert feeder.broker_restarted(done=2) == 4 and feeder.lost == 4
    assert producers[0].closed and len(producers) == 2, "a new producer: an idempotent one dies with its broker"
    assert feeder.top_up(done=2) == 4 and producers[1].sent == ["p0-e2", "p1-e2", "p2-e2", "p0-e3"]
    assert feeder.top_up(done=6) == 4 and feeder.sent == 14


def test_failed_sends_are_not_outstanding():
    producer = FakeProducer(fail=True)
    feeder = PromptFeeder(lambda: producer, PROMPTS, backlog=2)
    assert feeder.top_up(done=0) == 2 and feeder.lost == 2 and feeder.outstanding(0) == 0
    producer.fail = False
    assert feeder.top_up(done=0) == 2 and producer.sent == ["p2", "p0-e1"], "it goes on, skipping the failed ones"


def test_the_position_survives_in_feed_json_and_a_resumed_feeder_continues(tmp_path):
    state = tmp_path / "feed.json"
    assert load_position(tmp_path) == 0
    feeder = PromptFeeder(FakeProducer, PROMPTS, backlog=5, state_file=state, save_every_s=0)
    feeder.top_up(done=0)
    assert json.loads(state.read_text())["sent"] == 5, "written as it goes (every few seconds)"
    feeder.top_up(done=2)
    feeder.close()
    assert load_position(tmp_path) == 7 and json.loads(state.read_text())["prompts"] == 3

    producer = FakeProducer()
    resumed = PromptFeeder(lambda: producer, PROMPTS, backlog=2, start=load_position(tmp_path), state_file=state)
    assert resumed.top_up(done=0) == 2 and producer.sent == ["p1-e2", "p2-e2"], "after the last prompt fed"
    assert (resumed.sent, resumed.sent_this_run) == (9, 2)
    resumed.close()
    assert load_position(tmp_path) == 9
    state.write_text("{not json")
    assert load_position(tmp_path) == 0


def _ready(v: int) -> AdapterReady:
    return AdapterReady(version=v, path=f"policy-v{v}", sha256="0" * 64, base_model="m", parent_version=v - 1,
                        pairs_trained=16, metrics=TrainMetrics(loss=0.6, reward_margin=0.1, reward_accuracy=0.7,
                                                               steps=4))


def test_a_run_folder_with_versions_is_resumed_and_rounds_count_from_there(tmp_path):
    run = tmp_path / "run"
    assert not earlier_run(run) and store_version(run / "store") == 0
    (run / "store").mkdir(parents=True)
    assert not earlier_run(run), "an empty store is a fresh run"
    (run / "feed.json").write_text('{"sent": 12}')
    assert earlier_run(run) and store_version(run / "store") == 0, "stopped before v1: resumed at version 0"
    for v in (1, 2, 3):
        (run / "store" / f"policy-v{v}").mkdir()
        (run / "store" / f"policy-v{v}" / "adapter_model.safetensors").write_bytes(b"x")
        write_manifest(run / "store", _ready(v))
    assert store_version(run / "store") == 3
    assert stop_version(3, 2) == 5 and stop_version(0, 2) == 2 and stop_version(3, None) is None

    # The gate's decisions of the first run (kept by the gateway) do not end the resumed run ...
    book = VersionBook(tolerance=0.02)
    book.next_evaluation()
    book.decide(0, 0.5)
    for v in (1, 2, 3):
        book.add(_ready(v))
        book.next_evaluation()
        book.decide(v, 0.5 + v / 100)
    target = stop_version(store_version(run / "store"), 1)
    assert decided_through(book.snapshot(), 3) and not decided_through(book.snapshot(), target)
    # ... nor are they printed again as this run's events
    events = EventLog(skip_through=3)
    lines = events.lines(LoopCounts(adapters=[_ready(3)]), book.snapshot())
    assert not any("policy-v" in line or "published" in line for line in lines), lines
    book.add(_ready(4))
    book.next_evaluation()
    book.decide(4, 0.6)
    assert decided_through(book.snapshot(), target)
    assert "policy-v4 passed (held-out score 0.600)" in events.lines(LoopCounts(), book.snapshot())
