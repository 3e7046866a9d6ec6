"""`odpo dlq replay` on the real broker (service/dlq.py, the CLI in service/cli.py).

Dead letters are made by a real `Inbox` consumer of odpo.preferences with a message key: a valid pair the
consumer rejected for a passing reason (what the trainer does with a pair it cannot tokenize, or a window
with a non-finite loss), a pair that fails validation, and a valid but unsigned record (dead-lettered for its
signature). A replay puts back the first only, signed, once: a second run replays nothing, the invalid one is
reported with its reason, the unsigned one is skipped unless --resign. Each test has a broker of its own.
"""

from __future__ import annotations

import time

import pytest

from core import bus, signing, topics
from core.broker import EmbeddedBroker
from core.contracts import TOPIC_DLQ_REPLAYED, TOPIC_PREFERENCES, ChatMessage, DeadLetter, PreferencePair, PromptEvent
from core.message_keys import parse_keys
from core.topics import topic_name
from service.cli import main

KEY = "k1:" + "s" * 32


def _pair(tag: str) -> PreferencePair:
    prompt = PromptEvent(id=f"p-{tag}", messages=[ChatMessage(role="user", content="Say hi.")], source="test")
    return PreferencePair(id=f"pair-{tag}", prompt=prompt, chosen="Hello there, friend.", rejected="no",
                          policy_version=0, judge="test")


@pytest.fixture()
def deployment(monkeypatch):
    """A broker of this test's own, signing on, this process's names restored afterwards."""
    monkeypatch.setattr(topics, "_layout", topics._layout)
    monkeypatch.setattr(bus, "_security", bus._security)
    signing.configure(parse_keys(KEY))
    with EmbeddedBroker() as broker:
        monkeypatch.setenv("ODPO_BOOTSTRAP_SERVERS", broker.bootstrap)
        monkeypatch.setenv("ODPO_MESSAGE_KEY", KEY)
        yield broker
    signing.reset()


def _dead_letters(bootstrap: str, group: str = "odpo-trainer") -> list:
    """Three dead letters on odpo.dlq, written by a real consumer; returns the envelopes it accepted."""
    bus.ensure_topics(bootstrap)
    producer = bus.make_producer(bootstrap)
    topic = topic_name(TOPIC_PREFERENCES)
    bus.publish(producer, topic, "p-ok", _pair("ok"))  # valid, signed: rejected later for a passing reason
    bad = _pair("bad").model_dump(mode="json") | {"rejected": "Hello there, friend."}  # chosen == rejected
    import json

    bus.send(producer, topic, "p-bad", json.dumps(bad).encode()).get(timeout=30)
    producer.send(topic, key=b"p-unsigned", value=_pair("unsigned").to_bytes()).get(timeout=30)  # no signature
    inbox = bus.Inbox(bootstrap, topic, PreferencePair, "trainer", producer, group_id=group)
    got, deadline = [], time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        got += inbox.poll(300)
    assert [e.value.id for e in got] == ["pair-ok"] and inbox.dead_lettered == 2
    inbox.reject(got[0], "untrainable pair: the tokenizer was not loaded (a passing failure)")
    inbox.commit()  # everything read: the two dead-lettered ones and the rejected one
    inbox.close()
    producer.close()
    return got


def _read(bootstrap: str, topic: str, want: int, timeout_s: float = 10) -> list:
    tail = bus.TopicTail(bootstrap, [topic])
    seen, deadline = [], time.monotonic() + timeout_s
    try:
        while len(seen) < want and time.monotonic() < deadline:
            seen += tail.poll(300)
        seen += tail.poll(300)
    finally:
        tail.close()
    return seen


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["dlq", "replay", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _outcomes(table: str) -> dict[str, str]:
    """key -> outcome column, from the printed table."""
    rows = {}
    for line in table.splitlines()[1:-1]:
        cols = line.split()
        rows[cols[2]] = " ".join(cols[4:6]) if cols[4] in ("still", "would") else cols[4]
    return rows


def test_a_dead_letter_is_replayed_once_signed_and_the_invalid_one_is_reported(deployment, capsys):
    bootstrap = deployment.bootstrap
    _dead_letters(bootstrap)
    assert len(_read(bootstrap, topic_name("odpo.dlq"), 3)) == 3

    rc, out, err = _run(capsys, "--topic", "odpo.preferences", "--dry-run")
    assert rc == 0, err
    assert _outcomes(out) == {"p-ok": "would replay", "p-bad": "still invalid", "p-unsigned": "skipped"}, out
    assert "chosen and rejected are identical" in out and "--resign" in out
    assert out.splitlines()[-1].startswith("odpo.preferences: 1 would replay, 1 still invalid, 1 skipped")
    consumer = bus.new_consumer(bootstrap)
    try:
        assert topic_name(TOPIC_DLQ_REPLAYED) not in consumer.topics()  # a dry run writes nothing
    finally:
        consumer.close()
    assert len(_read(bootstrap, topic_name(TOPIC_PREFERENCES), 4, timeout_s=3)) == 3

    rc, out, err = _run(capsys, "--topic", "odpo.preferences")
    assert rc == 0, err
    assert _outcomes(out) == {"p-ok": "replayed", "p-bad": "still invalid", "p-unsigned": "skipped"}, out
    # the copy is on odpo.preferences, signed: the trainer's group (committed past the originals) takes it
    producer = bus.make_producer(bootstrap)
    inbox = bus.Inbox(bootstrap, topic_name(TOPIC_PREFERENCES), PreferencePair, "trainer", producer,
                      group_id="odpo-trainer")
    got, deadline = [], time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        got += inbox.poll(300)
    got += inbox.poll(1000)
    assert [e.value.id for e in got] == ["pair-ok"] and inbox.dead_lettered == 0
    inbox.commit(got)
    inbox.close()
    producer.close()

    rc, out, err = _run(capsys, "--topic", "odpo.preferences")  # again: nothing twice
    assert rc == 0, err
    assert _outcomes(out) == {"p-ok": "skipped", "p-bad": "still invalid", "p-unsigned": "skipped"}, out
    assert "replayed before" in out
    assert out.splitlines()[-1].startswith("odpo.preferences: 0 replayed, 1 still invalid, 2 skipped")
    assert len(_read(bootstrap, topic_name(TOPIC_PREFERENCES), 5, timeout_s=3)) == 4  # 3 originals + 1 copy

    rc, out, err = _run(capsys, "--topic", "odpo.preferences", "--resign")
    assert rc == 0, err
    assert _outcomes(out)["p-unsigned"] == "replayed", out
    markers = _read(bootstrap, topic_name(TOPIC_DLQ_REPLAYED), 2)
    assert len(markers) == 2 and all(m.headers for m in markers)  # signed markers, one per replayed record


def test_selection_limit_and_other_topics(deployment, capsys):
    bootstrap = deployment.bootstrap
    _dead_letters(bootstrap)
    rc, out, _ = _run(capsys, "--topic", "odpo.preferences", "--since", "2999-01-01T00:00:00Z")
    assert rc == 0 and "0 replayed" in out and "3 before --since/--from-offset" in out, out
    rc, out, _ = _run(capsys, "--topic", "odpo.preferences", "--from-offset", "1")  # the DLQ's 2nd and 3rd
    assert _outcomes(out) == {"p-unsigned": "skipped", "p-ok": "replayed"} and "1 before" in out, out
    rc, out, _ = _run(capsys, "--topic", "odpo.prompts")
    assert rc == 0 and "0 replayed" in out and "3 of other topics" in out, out


def test_limit_and_a_forged_dead_letter(deployment, capsys):
    """--limit stops after N; a DeadLetter written to odpo.dlq without a signature is never replayed (the replay
    would sign its payload)."""
    bootstrap = deployment.bootstrap
    bus.ensure_topics(bootstrap)
    producer = bus.make_producer(bootstrap)
    for i in range(3):
        letter = DeadLetter(source_topic=topic_name(TOPIC_PREFERENCES), partition=0, offset=i, key=f"p-{i}",
                            payload=_pair(str(i)).model_dump_json(), error="untrainable pair: test",
                            component="trainer")
        bus.publish(producer, topic_name("odpo.dlq"), f"p-{i}", letter)
    forged = DeadLetter(source_topic=topic_name(TOPIC_PREFERENCES), partition=0, offset=9, key="forged",
                        payload=_pair("forged").model_dump_json(), error="x", component="trainer")
    producer.send(topic_name("odpo.dlq"), key=b"forged", value=forged.to_bytes()).get(timeout=30)
    producer.close()
    rc, out, _ = _run(capsys, "--topic", "odpo.preferences", "--limit", "2")
    assert rc == 0 and _outcomes(out) == {"p-0": "replayed", "p-1": "replayed"}, out
    assert "1 left by --limit" in out and "1 not validly signed" in out, out
    rc, out, _ = _run(capsys, "--topic", "odpo.preferences")
    assert _outcomes(out) == {"p-0": "skipped", "p-1": "skipped", "p-2": "replayed"}, out


@pytest.mark.parametrize("args, says", [
    ([], "--topic TOPIC"),
    (["--topic", "odpo.nope"], "can be replayed to"),
    (["--topic", "odpo.dlq"], "can be replayed to"),
    (["--topic", "odpo.preferences", "--limit", "0"], "--limit must be >= 1"),
    (["--topic", "odpo.preferences", "--limit", "many"], "whole number"),
    (["--topic", "odpo.preferences", "--from-offset", "-1"], "--from-offset must be >= 0"),
    (["--topic", "odpo.preferences", "--since", "last week"], "ISO 8601"),
    (["--topic", "odpo.preferences", "--since", "2025-01-01", "--from-offset", "3"], "give one of them"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, says, capsys):
    rc, out, err = _run(capsys, *args)
    assert rc == 2 and not out and err.count("\n") == 1 and says in err, err


def test_an_unreachable_broker_is_one_line_and_exit_2(monkeypatch, capsys):
    from core.broker import free_port

    monkeypatch.setattr(topics, "_layout", topics._layout)
    monkeypatch.setattr(bus, "_security", bus._security)
    monkeypatch.setenv("ODPO_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    rc, out, err = _run(capsys, "--topic", "odpo.preferences")
    assert rc == 2 and err.count("\n") == 1 and "cannot read or write the broker" in err, err
