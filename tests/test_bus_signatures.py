"""Signed messages on the real broker: with a message key, an unsigned or wrongly signed record is dead-lettered
(skipped on odpo.control), a signed one goes through, an old key is accepted while it is listed, and the
control-topic reader survives records it cannot read (epoch 1e999, not JSON, a head of the wrong shape)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from kafka import TopicPartition
from prometheus_client import REGISTRY

from core import signing
from core.bus import Inbox, TopicTail, make_producer, publish, send
from core.contracts import TOPIC_DLQ, TOPIC_PREFERENCES, DeadLetter, PreferencePair
from core.message_keys import MessageKeyError, parse_keys
from core.settings import CommonSettings
from service.gate.metrics import ScoreGauge
from service.registry.book import VersionBook
from service.registry.follower import RegistryFollower

NEW = "k2:" + "n" * 32
OLD = "k1:" + "o" * 32
OTHER = "k0:" + "x" * 32  # not listed


@pytest.fixture()
def keys():
    """This process signs with k2 and accepts k2 and k1 (a rotation half done); forgotten afterwards."""
    signing.configure(parse_keys(f"{NEW},{OLD}"))
    yield
    signing.reset()


def pair(tag: str) -> PreferencePair:
    from core.contracts import ChatMessage, PromptEvent

    prompt = PromptEvent(id=f"sig-{tag}", messages=[ChatMessage(role="user", content="Say hi.")], source="test")
    return PreferencePair(id=f"pair-{tag}", prompt=prompt, chosen="Hello there, friend.", rejected="no",
                          policy_version=0, judge="test")


def signed_by(key: str, topic: str, value: bytes) -> list:
    return [(signing.HEADER, parse_keys(key).header(topic, value))]


def letters_for(bootstrap: str, keys_wanted: set[str], timeout_s: float = 30) -> dict[str, DeadLetter]:
    tail = TopicTail(bootstrap, [TOPIC_DLQ], client_id="odpo-test-tail")
    found: dict[str, DeadLetter] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not keys_wanted <= set(found) and time.monotonic() < deadline:
            for rec in tail.poll(300):
                letter = DeadLetter.from_bytes(rec.value)
                if letter.key in keys_wanted:
                    found[letter.key] = letter
    finally:
        tail.close()
    return found


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("odpo_bus_signature_failures_total",
                                     {"component": "trainer", "topic": TOPIC_PREFERENCES, "reason": reason}) or 0.0


def test_unsigned_and_missigned_pairs_are_dead_lettered_and_signed_ones_read(own_broker, keys):
    bootstrap, run = own_broker.bootstrap, uuid.uuid4().hex[:6]
    producer = make_producer(bootstrap)
    group = f"test-{run}"
    before = {r: failures(r) for r in ("unsigned", "mismatch", "unknown_key")}
    inbox = Inbox(bootstrap, TOPIC_PREFERENCES, PreferencePair, "trainer", producer, group_id=group)
    try:
        good, old, unsigned, wrong, other, tampered = (pair(f"{run}-{n}") for n in
                                                       ("good", "old", "unsigned", "wrong", "other", "tampered"))
        publish(producer, TOPIC_PREFERENCES, good.prompt.id, good)  # signed with k2 (the first key)
        raw = old.to_bytes()
        producer.send(TOPIC_PREFERENCES, key=old.prompt.id.encode(), value=raw,
                      headers=signed_by(OLD, TOPIC_PREFERENCES, raw))  # the old key, still listed
        producer.send(TOPIC_PREFERENCES, key=unsigned.prompt.id.encode(), value=unsigned.to_bytes())
        raw = wrong.to_bytes()
        producer.send(TOPIC_PREFERENCES, key=wrong.prompt.id.encode(), value=raw,
                      headers=signed_by(NEW, "odpo.prompts", raw))  # signed for another topic
        raw = other.to_bytes()
        producer.send(TOPIC_PREFERENCES, key=other.prompt.id.encode(), value=raw,
                      headers=signed_by(OTHER, TOPIC_PREFERENCES, raw))  # a key nobody lists
        raw = tampered.to_bytes()
        producer.send(TOPIC_PREFERENCES, key=tampered.prompt.id.encode(), value=raw.replace(b"friend", b"fiend!"),
                      headers=signed_by(NEW, TOPIC_PREFERENCES, raw))  # the value changed after signing
        producer.flush()
        got: list = []
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            got.extend(inbox.poll(timeout_ms=500))
        for _ in range(3):
            got.extend(inbox.poll(timeout_ms=300))
    finally:
        inbox.close()
    assert sorted(e.value.id for e in got) == sorted([good.id, old.id])
    bad = {p.prompt.id for p in (unsigned, wrong, other, tampered)}
    letters = letters_for(bootstrap, bad)
    assert set(letters) == bad
    assert "signature: unsigned" in letters[unsigned.prompt.id].error
    assert "signature: mismatch" in letters[wrong.prompt.id].error
    assert "signature: unknown_key" in letters[other.prompt.id].error
    assert "signature: mismatch" in letters[tampered.prompt.id].error
    assert all(d.component == "trainer" for d in letters.values())
    assert failures("unsigned") - before["unsigned"] == 1 and failures("unknown_key") - before["unknown_key"] == 1
    assert failures("mismatch") - before["mismatch"] == 2
    producer.close()


def test_without_a_key_nothing_is_signed_or_checked(own_broker):
    signing.configure(None)
    try:
        assert signing.headers(TOPIC_PREFERENCES, b"x") == []
        assert signing.refusal(TOPIC_PREFERENCES, b"x", [], "trainer") is None
    finally:
        signing.reset()


def test_key_settings():
    keys = parse_keys(f"{NEW}\n{OLD}\n# retired: k0\n")
    assert keys.signing == "k2" and [k for k, _ in keys.keys] == ["k2", "k1"]
    for bad in ("nocolon" + "s" * 20, "k:short", "bad id:" + "s" * 20, f"{NEW},{NEW}", ""):
        with pytest.raises(MessageKeyError):
            parse_keys(bad)
    assert CommonSettings(message_key=NEW).message_key.get_secret_value() == NEW
    with pytest.raises(ValueError):
        CommonSettings(message_key="k:short")


def test_signed_pairs_train_and_unsigned_ones_are_dead_lettered_by_the_trainer(broker, producer, group_id,
                                                                             model_dir, tmp_path, keys):
    from transformers import AutoTokenizer

    from core.contracts import TOPIC_ADAPTERS
    from core.settings import TrainerSettings
    from tests.test_trainer_service import Running, _adapters, end_offset, start_group_at_end
    from tests.test_trainer_train import make_pairs

    tok = AutoTokenizer.from_pretrained(model_dir)
    bootstrap, store = broker.bootstrap, tmp_path / "store"
    common = CommonSettings(bootstrap_servers=bootstrap, store_dir=store, base_model=model_dir)
    settings = TrainerSettings(window_pairs=4, steps_per_window=1, batch_pairs=4, group_id=group_id)
    start_group_at_end(bootstrap, group_id)
    tag = uuid.uuid4().hex[:6]
    pairs = make_pairs(tok, 6, tag=tag)
    adapters_start = end_offset(bootstrap, TopicPartition(TOPIC_ADAPTERS, 0))
    with Running(common, settings):
        unsigned, wrong = pairs[4], pairs[5]
        producer.send(TOPIC_PREFERENCES, key=unsigned.prompt.id.encode(), value=unsigned.to_bytes())
        raw = wrong.to_bytes()
        producer.send(TOPIC_PREFERENCES, key=wrong.prompt.id.encode(), value=raw,
                      headers=signed_by(OTHER, TOPIC_PREFERENCES, raw))
        for p in pairs[:4]:
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p)
        ready = [a for a in _adapters(bootstrap, adapters_start, 1) if a.version == 1]
    assert len(ready) == 1 and ready[0].pairs_trained == 4
    trained = json.loads((store / "policy-v1" / "trainer_state.json").read_text())["trained_ids"]
    assert sorted(trained) == sorted(p.id for p in pairs[:4])  # the signed ones
    letters = letters_for(bootstrap, {unsigned.prompt.id, wrong.prompt.id})
    assert {d.component for d in letters.values()} == {"trainer"} and len(letters) == 2


# -- the control topic ----------------------------------------------------------------------------------------
def _reader(bootstrap: str, topic: str) -> RegistryFollower:
    return RegistryFollower(VersionBook(0.0), bootstrap, topic, f"test-{uuid.uuid4().hex[:4]}").start()


def _gate(bootstrap: str, topic: str):
    from service.gate.control import GateControl

    return GateControl(VersionBook(0.05), bootstrap, topic, ScoreGauge(4), {"heldout_prompts": 3}).attach().start()


def _until(predicate, timeout_s: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f}s"
        time.sleep(0.05)
    return value


def test_the_control_reader_skips_unsigned_and_unreadable_records(own_broker, keys):
    from tests.test_gateway_book import ready

    bootstrap = own_broker.bootstrap
    topic = f"odpo.control.test-{uuid.uuid4().hex[:8]}"
    gate, reader = _gate(bootstrap, topic), _reader(bootstrap, topic)
    forger = make_producer(bootstrap)
    try:
        _until(lambda: gate.term, what="the gate writes")
        gate.book.add(ready(1))
        gate.book.promote(1)
        _until(lambda: reader.book.promoted == 1, what="the reader follows the gate")
        # An unsigned head from a "gate" of a far higher epoch: it would fence the real gate for good.
        head = {"schema_version": 1, "epoch": 999, "writer": "forger", "url": "", "seq": 10 ** 6, "promoted": 0,
                "history": [0], "pinned": True, "evaluation": {}, "versions": {"0": "x"}}
        forger.send(topic, key=b"head", value=json.dumps(head).encode(), partition=0)
        forger.send(topic, key=b"claim", value=b'{"schema_version": 1, "epoch": 999, "writer": "forger"}',
                    partition=0)
        # Signed (a writer with the key, or a bug) but unreadable: never a crash, never a read loop.
        for key, value in ((b"claim", b'{"schema_version": 1, "epoch": 1e999, "writer": "x"}'),
                           (b"head", b"not json at all"),
                           (b"head", json.dumps({**head, "epoch": 1e999}).encode()),
                           (b"head", json.dumps({**head, "epoch": 50, "versions": ["0"]}).encode()),
                           (b"version-1", b"[1, 2")):
            send(forger, topic, key.decode(), value, partition=0)
        forger.flush()
        time.sleep(2)
        gate.book.add(ready(2))
        gate.book.promote(2)
        _until(lambda: reader.book.promoted == 2 and reader.applied_seq == gate.published_seq(),
               what="the reader follows the gate's next change after the bad records")
        assert gate.term and gate.role != "fenced" and not reader.book.pinned
        late = _reader(bootstrap, topic)  # a reader that starts now reads every bad record on its first pass
        try:
            _until(lambda: late.book.promoted == 2 and late.has_read, what="a new reader reads past them")
        finally:
            late.stop()
    finally:
        forger.close()
        reader.stop()
        gate.stop()
