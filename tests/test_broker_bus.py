import os
import socket
import time

import pytest

from core import bus
from core.broker import EmbeddedBroker, kafka_ready
from core.contracts import TOPIC_DLQ, TOPIC_PROMPTS, DeadLetter, PromptEvent


def _drain(inbox, want, timeout_s=30):
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += inbox.poll(500)
    return got


def test_broker_starts_and_stops_cleanly():
    b = EmbeddedBroker().start()
    pid, bootstrap = b.pid, b.bootstrap
    assert kafka_ready(bootstrap)
    b.stop()
    assert not b.running
    with socket.socket() as s:
        assert s.connect_ex((b.host, b.port)) != 0, "the port still accepts connections"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_invalid_messages_go_to_dlq_and_commit_resumes(broker, producer, group_id):
    topic = f"{TOPIC_PROMPTS}.{group_id}"  # a private topic: the session broker is shared
    bus.ensure_topics(broker.bootstrap, [topic])
    bus.publish(producer, topic, "a", PromptEvent(id="a", text="first"))
    producer.send(topic, key=b"bad", value=b'{"id": "", "text": "x"}')
    producer.send(topic, key=b"junk", value=b"\xff not json")
    bus.publish(producer, topic, "b", PromptEvent(id="b", text="second"))

    inbox = bus.Inbox(broker.bootstrap, topic, PromptEvent, "test", producer, group_id=group_id)
    got = _drain(inbox, 2)
    assert [e.value.id for e in got] == ["a", "b"] and inbox.dead_lettered == 2
    inbox.commit(got[:1])  # only "a" is done
    inbox.close()

    again = bus.Inbox(broker.bootstrap, topic, PromptEvent, "test", producer, group_id=group_id)
    assert [e.value.id for e in _drain(again, 1)] == ["b"]
    again.close()

    dlq = bus.Inbox(broker.bootstrap, TOPIC_DLQ, DeadLetter, "test", producer, group_id=None)
    letters, deadline = [], time.monotonic() + 30
    while {l.key for l in letters} < {"bad", "junk"} and time.monotonic() < deadline:
        letters += [e.value for e in dlq.poll(500) if e.value.source_topic == topic]
    dlq.close()
    assert {l.key for l in letters} >= {"bad", "junk"}
    bad = next(l for l in letters if l.key == "bad")
    assert "id" in bad.error and bad.payload == '{"id": "", "text": "x"}' and bad.component == "test"
