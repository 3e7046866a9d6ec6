"""The judge process on the real broker: pairs out, bad input to the DLQ, and it keeps going."""

from __future__ import annotations

import threading
import time
import uuid

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from judge.metrics import PLUGINS
from judge.service import JudgeLoop, run
from core.bus import Inbox, TopicTail, ensure_topics, make_producer
from core.contracts import (
    TOPIC_CANDIDATES,
    TOPIC_DLQ,
    TOPIC_PREFERENCES,
    CandidateSet,
    ChatMessage,
    Completion,
    DeadLetter,
    PreferencePair,
    PromptEvent,
    SamplingParams,
)
from core.settings import CommonSettings, JudgeSettings

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
    tail = TopicTail(bootstrap, [topic], client_id="odpo-test-tail")
    found: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while not done(found) and time.monotonic() < deadline:
            found.extend(r for r in tail.poll(300) if wanted(r))
    finally:
        tail.close()
    return found


LABELS = {"odpo_judge_pairs_total": {"judge": "verifier"}, "odpo_judge_dead_letters_total": {},
          "odpo_judge_candidate_sets_total": {}, "odpo_judge_score_count": {"judge": "verifier"}}


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_judge_pairs_dead_letters_and_carries_on(broker, producer, group_id):
    run_id = uuid.uuid4().hex[:8]
    ids = {k: f"{run_id}-{k}" for k in ("good", "tie", "junk", "math", "late")}
    before = {m: metric(m, **lab) for m, lab in LABELS.items()}
    ties_before = metric("odpo_judge_pairs_dropped_total", reason="tie")

    stop = threading.Event()
    # The plugin alone (no quality guard: these short answers would fail it as too short), so the pairs follow
    # the rule scores; the guard in the service is test_the_quality_guard_runs_in_the_service.
    settings = JudgeSettings(group_id=group_id, poll_timeout_s=0.2, composition="rules_only")
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

        mine = lambda r: r.key is not None and r.key.decode().startswith(run_id)
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
    gained = {m: metric(m, **lab) - before[m] for m, lab in LABELS.items()}
    assert gained["odpo_judge_pairs_total"] >= 2 and gained["odpo_judge_dead_letters_total"] >= 2
    assert gained["odpo_judge_candidate_sets_total"] >= 4 and gained["odpo_judge_score_count"] >= 3 + 3 + 2
    assert metric("odpo_judge_pairs_dropped_total", reason="tie") - ties_before >= 1


def judge_all(broker, producer, topic: str, end_offset: int, settings: JudgeSettings, group_id: str | None = None,
              timeout_s: float = TIMEOUT_S) -> None:
    """A fresh JudgeLoop (own group: no memory of earlier runs) steps until it has read `topic` through
    `end_offset` (exclusive)."""
    inbox = Inbox(broker.bootstrap, topic, CandidateSet, "judge", producer,
                  group_id=group_id or f"test-{uuid.uuid4().hex[:8]}")
    try:
        loop = JudgeLoop(inbox, producer, settings)
        deadline = time.monotonic() + timeout_s
        tp = TopicPartition(topic, 0)
        while (inbox.consumer.committed(tp) or 0) < end_offset:
            assert time.monotonic() < deadline, "the judge did not get through the topic"
            loop.step()
    finally:
        inbox.close()


def test_replayed_candidate_sets_publish_no_new_pair_ids(broker, producer):
    """The same events twice on the topic, then judged again by a judge without memory: no new pair ids."""
    run_id = uuid.uuid4().hex[:8]
    topic = f"test.candidates.{run_id}"  # only these sets, whatever other tests left on the shared topic
    ensure_topics(broker.bootstrap, [topic])
    sets = [candidate_set(f"{run_id}-{i}", [f"calm sea {i}", "The sea, the sea, the sea, wide, deep and cold."])
            for i in range(3)]
    for cset in sets + sets:  # an upstream replay: every event produced twice
        last = producer.send(topic, key=cset.prompt.id.encode(), value=cset.to_bytes()).get(timeout=30).offset
    mine = lambda r: r.key is not None and r.key.decode().startswith(run_id)
    # The default composition with the quality guard, its fluency term off (no model): "calm sea 0" fails the
    # guard (too short), so each set's one pair is the long answer over it.
    settings = JudgeSettings(poll_timeout_s=0.2, reference_logprob=False)
    duplicates = metric("odpo_judge_pairs_dropped_total", reason="duplicate")

    def judge_once() -> None:
        judge_all(broker, producer, topic, last + 1, settings)

    judge_once()
    first = read_until(broker.bootstrap, TOPIC_PREFERENCES, mine, lambda found: len(found) >= 6)
    assert len(first) == 6, "each set's two pairs once, its replay dropped"
    sampled = [p for p in map(PreferencePair.from_bytes, (r.value for r in first)) if not p.judge.endswith("+repair")]
    assert len(sampled) == 3 and all(p.rejected.startswith("calm sea") for p in sampled)
    # and each set's repair pair: the long answer without its commas over the long answer
    assert all(p.chosen == p.rejected.replace(",", "") for p in map(PreferencePair.from_bytes, (r.value for r in first))
               if p.judge.endswith("+repair"))
    assert metric("odpo_judge_pairs_dropped_total", reason="duplicate") - duplicates == 6
    ids = {PreferencePair.from_bytes(r.value).id for r in first}
    assert len(ids) == 6

    judge_once()  # a restarted judge (empty seen-ids cache) judging every event again
    again = read_until(broker.bootstrap, TOPIC_PREFERENCES, mine, lambda found: len(found) >= 12)
    assert {PreferencePair.from_bytes(r.value).id for r in again} == ids  # the trainer's ledger drops these


def test_pairing_settings_reach_the_service(broker, producer):
    """all_pairs with the length guard on: longer winners dropped and counted, the chosen-longer share exported."""
    run_id = uuid.uuid4().hex[:8]
    topic = f"test.candidates.{run_id}"
    ensure_topics(broker.bootstrap, [topic])
    task = {"kind": "regex", "pattern": "sea"}  # 1 if the answer mentions the sea
    texts = ["the sea", "the sea is wide and deep and cold", "the sky!", "a long answer about the sky"]
    cset = candidate_set(f"{run_id}-lg", texts, task=task)
    last = producer.send(topic, key=cset.prompt.id.encode(), value=cset.to_bytes()).get(timeout=30).offset
    settings = JudgeSettings(pairing="all_pairs", length_guard="drop", max_pairs_per_prompt=10, poll_timeout_s=0.2,
                             composition="rules_only")  # the regex alone decides (no guard: 2-word answers)
    before = {r: metric("odpo_judge_pairs_dropped_total", reason=r) for r in ("tie", "length")}
    longer_before = metric("odpo_judge_pairs_chosen_longer_total")
    judge_all(broker, producer, topic, last + 1, settings, group_id=f"test-{run_id}")
    mine = lambda r: r.key == cset.prompt.id.encode()
    found = read_until(broker.bootstrap, TOPIC_PREFERENCES, mine, lambda found: len(found) >= 2)
    pairs = {(p.chosen, p.rejected) for p in map(PreferencePair.from_bytes, (r.value for r in found))}
    # 6 candidate pairs: 2 ties (sea/sea, sky/sky) and 4 where a sea answer wins; the long sea answer
    # is longer than both sky answers, so its 2 wins are dropped by the guard.
    assert pairs == {("the sea", "the sky!"), ("the sea", "a long answer about the sky")}
    assert metric("odpo_judge_pairs_dropped_total", reason="tie") - before["tie"] == 2
    assert metric("odpo_judge_pairs_dropped_total", reason="length") - before["length"] == 2
    assert metric("odpo_judge_pairs_chosen_longer_total") == longer_before  # none of the published ones
    published = sum(metric("odpo_judge_pairs_total", judge=j + repaired) for j in PLUGINS for repaired in ("", "+repair"))
    assert metric("odpo_judge_chosen_longer_ratio") == metric("odpo_judge_pairs_chosen_longer_total") / published


def test_a_plugin_that_cannot_start_is_a_usage_error(monkeypatch, capsys, tmp_path):
    from service.cli import main

    monkeypatch.setenv("ODPO_JUDGE_JUDGE", "reward_model")
    assert main(["judge"]) == 2
    assert capsys.readouterr().err.strip() == ("odpo: error: judge reward_model: judge=reward_model needs "
                                               "ODPO_JUDGE_REWARD_MODEL_PATH (a local HF model folder)")
    monkeypatch.setenv("ODPO_JUDGE_REWARD_MODEL_PATH", str(tmp_path))
    assert main(["judge"]) == 2
    assert "is not a local HF model folder" in capsys.readouterr().err
    monkeypatch.setenv("ODPO_JUDGE_JUDGE", "oracle")
    assert main(["judge"]) == 2
    assert "ODPO_JUDGE_JUDGE" in capsys.readouterr().err


def test_the_quality_guard_runs_in_the_service(own_broker, group_id, model_dir):
    """The default judge (verifier x quality guard, the base model scoring fluency) on the real broker: the
    one-word, empty, repeated and off-topic answers are never chosen, and each failure is counted by reason."""
    from service.task import make_prompts

    run_id = uuid.uuid4().hex[:8]
    zoo = next(p for p in make_prompts("heldout", 40) if p.task["topic"] == "the zoo"
               and [c["type"] for c in p.task["constraints"]] == ["lowercase", "no_commas", "on_topic"])
    good = ["the zoo is a happy place where families meet friendly animals",
            "the zoo has lions and bears and the children love to see them"]
    bad = {"no": "too_short", "": "empty", "zoo zoo zoo zoo zoo zoo": "repetitive",
           "my old car needs new tires and a good wash": "off_topic"}
    cset = candidate_set(f"{run_id}-zoo", [*bad, *good])
    cset = cset.model_copy(update={"prompt": zoo.model_copy(update={"id": f"{run_id}-zoo"})})
    settings = JudgeSettings(group_id=group_id, poll_timeout_s=0.2, pairing="all_pairs", max_pairs_per_prompt=20)
    assert (settings.composition, settings.reference_logprob) == ("product", True)  # the defaults under test
    failures_before = {r: metric("odpo_judge_guard_failures_total", reason=r) for r in set(bad.values())}
    degenerate_before = metric("odpo_judge_pairs_dropped_total", reason="degenerate")

    # A broker of its own: the judge reads odpo.candidates from the start, and counts only these answers.
    stop = threading.Event()
    common = CommonSettings(bootstrap_servers=own_broker.bootstrap, base_model=model_dir)
    thread = threading.Thread(target=run, args=(common, settings, stop), daemon=True)
    thread.start()
    producer = make_producer(own_broker.bootstrap)
    try:
        send(producer, cset.prompt.id, cset.to_bytes())
        mine = lambda r: r.key == cset.prompt.id.encode()
        found = read_until(own_broker.bootstrap, TOPIC_PREFERENCES, mine, lambda found: len(found) >= 8)
    finally:
        stop.set()
        thread.join(timeout=20)
        producer.close()
    assert not thread.is_alive()
    pairs = [PreferencePair.from_bytes(r.value) for r in found]
    # Each good answer over each of the 4 bad ones; the two good ones both satisfy every rule, and the
    # fluency term may or may not separate them.
    assert {(p.chosen, p.rejected) for p in pairs if p.rejected in bad} == {(g, b) for g in good for b in bad}
    assert {p.chosen for p in pairs} <= set(good)
    assert all(p.rejected_score == -1.0 and 0 < p.chosen_score <= 1 for p in pairs if p.rejected in bad)
    for reason in set(bad.values()):
        assert metric("odpo_judge_guard_failures_total", reason=reason) - failures_before[reason] == 1
    # The 6 pairs among the bad answers (all scored -1) are dropped as degenerate, not published.
    assert metric("odpo_judge_pairs_dropped_total", reason="degenerate") - degenerate_before == 6
