"""The judge process on the real broker: pairs out, bad input to the DLQ, and it keeps going."""

from __future__ import annotations

import threading
import time
import uuid

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from judge.service import run
from service.contracts import (TOPIC_CANDIDATES, TOPIC_DLQ, TOPIC_PREFERENCES, CandidateSet, ChatMessage,
                               Completion, DeadLetter, PreferencePair, PromptEvent, SamplingParams)
from service.settings import CommonSettings, JudgeSettings

TIMEOUT_S = 60


def candidate_set(prompt_id: str, texts: list[str], task: dict | None = None, version: int = 1) -> CandidateSet:
    task = task or {"kind": "constraints", "constraints": [{"type": "max_words", "n": 5}, {"type": "no_commas"}]}
    prompt = PromptEvent(id=prompt_id, messages=[ChatMessage(role="user", content="Describe the sea briefly.")],
                         task=task, source="test")
    comps = [Completion(text=t, token_ids=[100 + i, 200 + i, 2], logprobs=[-0.25 * (i + 1), -1.5, -0.01],
                        finish_reason="stop") for i, t in enumerate(texts)]
    return CandidateSet(prompt=prompt, prompt_token_ids=[1, 9, 4, 7], completions=comps, policy_version=version,
                        sampling=SamplingParams(n=len(texts), temperature=1.0, top_p=1.0, max_tokens=48))


def send(producer, key: str, value: bytes) -> int:
    meta = producer.send(TOPIC_CANDIDATES, key=key.encode(), value=value).get(timeout=30)
    return meta.offset


def read_until(bootstrap: str, topic: str, wanted, done, timeout_s: float = TIMEOUT_S) -> list:
    """Records of `topic` (from the start) for which `wanted(record)` holds, once `done(list)` is true."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    found: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while not done(found) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                found.extend(r for r in records if wanted(r))
    finally:
        consumer.close()
    return found


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_judge_pairs_dead_letters_and_carries_on(broker, producer, group_id):
    run_id = uuid.uuid4().hex[:8]
    ids = {k: f"{run_id}-{k}" for k in ("good", "tie", "junk", "math", "late")}
    before = {m: metric(m) for m in ("odpo_judge_pairs_total", "odpo_judge_dead_letters_total",
                                     "odpo_judge_candidate_sets_total", "odpo_judge_score_count")}
    ties_before = metric("odpo_judge_pairs_dropped_total", reason="tie")

    stop = threading.Event()
    settings = JudgeSettings(group_id=group_id, poll_timeout_s=0.2)
    thread = threading.Thread(target=run, args=(CommonSettings(bootstrap_servers=broker.bootstrap), settings, stop),
                              daemon=True)
    thread.start()
    try:
        worst_text = "The sea is wide, deep, old, cold, and it is full of life."  # too long, 4 commas: 0
        good = candidate_set(ids["good"], [worst_text,
                                           "calm blue sea", "The sea, so blue."])
        send(producer, ids["good"], good.to_bytes())
        send(producer, ids["tie"], candidate_set(ids["tie"], ["calm sea", "blue sea", "wide sea"]).to_bytes())
        send(producer, ids["junk"], b'{"prompt": oops, not json')
        math = candidate_set(ids["math"], ["4", "five"], task={"kind": "math", "answer": "4"})
        send(producer, ids["math"], math.to_bytes())
        late = candidate_set(ids["late"], ["- the sea\n- the sky, the sand, the sun", "sea and sky"], version=3)
        last_offset = send(producer, ids["late"], late.to_bytes())

        mine = lambda r: r.key is not None and r.key.decode().startswith(run_id)  # noqa: E731
        pair_records = read_until(broker.bootstrap, TOPIC_PREFERENCES, mine,
                                  lambda found: {r.key.decode() for r in found} >= {ids["good"], ids["late"]})
        dead_records = read_until(broker.bootstrap, TOPIC_DLQ, mine,
                                  lambda found: {r.key.decode() for r in found} >= {ids["junk"], ids["math"]})
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive(), "the judge did not stop within 20 s of the stop event"

    pairs = {r.key.decode(): PreferencePair.from_bytes(r.value) for r in pair_records}
    # The tie was judged before `late` (same partition, in order), so its absence is final.
    assert set(pairs) == {ids["good"], ids["late"]}
    p = pairs[ids["good"]]
    assert (p.chosen, p.rejected) == ("calm blue sea", worst_text)  # "The sea, so blue." scores 0.875
    assert (p.chosen_score, p.rejected_score) == (1.0, 0.0) and p.margin == 1.0 and p.judge == "verifier"
    assert p.prompt == good.prompt and p.policy_version == 1
    assert p.prompt_token_ids == [1, 9, 4, 7]
    assert p.chosen_token_ids == [101, 201, 2] and p.rejected_token_ids == [100, 200, 2]
    assert p.chosen_logprobs == [-0.5, -1.5, -0.01] and p.rejected_logprobs == [-0.25, -1.5, -0.01]
    q = pairs[ids["late"]]
    assert (q.chosen, q.policy_version) == ("sea and sky", 3) and q.rejected.startswith("- the sea")

    letters = {r.key.decode(): DeadLetter.from_bytes(r.value) for r in dead_records}
    assert set(letters) == {ids["junk"], ids["math"]}
    assert letters[ids["junk"]].component == "judge" and "CandidateSet" in letters[ids["junk"]].error
    assert letters[ids["junk"]].payload == '{"prompt": oops, not json'
    assert "kind 'math'" in letters[ids["math"]].error and letters[ids["math"]].source_topic == TOPIC_CANDIDATES
    assert CandidateSet.from_bytes(letters[ids["math"]].payload.encode()) == math  # the set can be replayed

    # Offsets are committed through the last message once its pair is flushed.
    check = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group_id, enable_auto_commit=False)
    try:
        assert check.committed(TopicPartition(TOPIC_CANDIDATES, 0)) >= last_offset + 1
    finally:
        check.close()

    # Other tests may share the session broker and its topics, hence >=.
    assert metric("odpo_judge_pairs_total") - before["odpo_judge_pairs_total"] >= 2
    assert metric("odpo_judge_dead_letters_total") - before["odpo_judge_dead_letters_total"] >= 2
    assert metric("odpo_judge_candidate_sets_total") - before["odpo_judge_candidate_sets_total"] >= 4
    assert metric("odpo_judge_score_count") - before["odpo_judge_score_count"] >= 3 + 3 + 2
    assert metric("odpo_judge_pairs_dropped_total", reason="tie") - ties_before >= 1
