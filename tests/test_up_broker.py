"""`odpo up` keeps its broker: a real Tansu killed with SIGKILL is restarted on the same address with its
topics; the topic watcher reads the new (empty) topics from their start, so it keeps counting without skipping
or counting anything twice; the prompt feeder forgets the prompts the old broker held and sends again."""

from __future__ import annotations

import os
import signal
import time

from core.broker import EmbeddedBroker
from core.bus import TopicTail, ensure_topics, make_producer
from core.contracts import TOPIC_CANDIDATES, TOPIC_PROMPTS
from service.launcher import RestartPolicy
from service.loop_watch import LoopWatcher
from service.prompt_feed import PromptFeeder
from service.task import make_prompts
from service.up_broker import BrokerKeeper


def _until(cond, timeout_s: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _candidates(bootstrap: str, n: int, tag: str) -> None:
    producer = make_producer(bootstrap)  # its own producer: an idempotent one does not survive a broker restart
    for i in range(n):
        producer.send(TOPIC_CANDIDATES, key=f"{tag}{i}".encode(), value=b"{}")  # the watcher counts by topic
    producer.flush()
    producer.close()


def test_broker_killed_is_restarted_and_the_watcher_and_feeder_carry_on(tmp_path):
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log").start()
    watcher = feeder = None
    try:
        ensure_topics(broker.bootstrap)
        watcher = LoopWatcher(broker.bootstrap)
        watcher.start()
        feeder = PromptFeeder(lambda: make_producer(broker.bootstrap), make_prompts("train", 8), backlog=4)
        calls = []

        def on_down():
            calls.append(("down", broker.running))
            assert watcher.rewind(), "the watcher rewinds while the broker is down"

        def on_up():
            c = watcher.snapshot()
            calls.append(("up", broker.running))
            return f"{feeder.broker_restarted(c.candidate_sets + c.dead_prompts)} prompt(s) waiting in it are skipped"

        keeper = BrokerKeeper(broker, RestartPolicy(backoff_initial_s=0.3), on_down=on_down, on_up=on_up)
        assert feeder.top_up(done=0) == 4
        _candidates(broker.bootstrap, 3, "before")
        _until(lambda: watcher.snapshot().candidate_sets == 3, what="3 candidate sets")
        assert keeper.check() == []

        bootstrap, old_pid = broker.bootstrap, keeper.state()["pid"]
        os.kill(old_pid, signal.SIGKILL)
        lines = []
        _until(lambda: lines.extend(keeper.check()) or keeper.restarts == 1, what="the broker's restart")
        assert lines[0].startswith("the broker exited with code -9 after") and f"on {bootstrap} in 0.3s" in lines[0]
        assert lines[1].startswith(f"broker restarted on {bootstrap} (restart 1, pid ")
        assert lines[1].endswith("1 prompt(s) waiting in it are skipped"), "4 sent, 3 done (the candidate sets)"
        assert calls == [("down", False), ("up", True)]
        state = keeper.state()
        assert state["pid"] != old_pid and state["status"] == "running" and state["restarts"] == 1
        assert broker.bootstrap == bootstrap

        # More records than the old topic had: a reader left at its old position would skip the first three.
        _candidates(broker.bootstrap, 6, "after")
        _until(lambda: watcher.snapshot().candidate_sets == 9, what="9 candidate sets (3 + 6)")
        time.sleep(1.5)
        assert watcher.snapshot().candidate_sets == 9, "nothing counted twice"

        assert feeder.top_up(done=3) == 4, "the feeder sends again (new producer) instead of waiting forever"
        tail = TopicTail(broker.bootstrap, [TOPIC_PROMPTS])
        got = []
        _until(lambda: got.extend(tail.poll()) or len(got) >= 4, what="the new prompts on the new broker")
        tail.close()
        assert len(got) == 4
    finally:
        if feeder:
            feeder.close()
        if watcher:
            watcher.stop()
            watcher.join(timeout=5)
        broker.stop()
