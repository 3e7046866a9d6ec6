"""The LLM judge against a real OpenAI-compatible server: the project's gateway on the packaged model (vLLM).

The 135M model is a poor judge (it answers by position), which is exactly
what the swapped-order check is for: its verdicts are compared with the
letters the gateway gives for each order when asked directly, one request at
a time (greedy), and position-following verdicts must come out as ties.
"""

from __future__ import annotations

import itertools
import re
import threading
import uuid

import httpx
import pytest
from kafka import TopicPartition
from prometheus_client import REGISTRY

from judge.base import JudgeUnavailable
from judge.llm_judge import LlmJudge, combine, render_prompt
from judge.service import JudgeLoop
from core.broker import free_port
from core.bus import Inbox, ensure_topics
from core.contracts import (
    TOPIC_PREFERENCES,
    CandidateSet,
    ChatMessage,
    PreferencePair,
    PromptEvent,
)
from core.settings import CommonSettings, GatewaySettings, JudgeSettings
from tests.gateway_server import register_base, running_gateway
from tests.test_judge_service import candidate_set, judge_all, read_until

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

# The LLM judge's own verdicts are under test, on one-word answers ("4", "A") that the quality guard would
# fail as too short: the plugin alone (`rules_only`); the guard is tested in tests/test_judge_composite.py.
SETTINGS = JudgeSettings(judge="llm_judge", llm_judge_model="base", llm_judge_max_tokens=8, llm_judge_concurrency=1,
                         llm_judge_retries=1, llm_judge_backoff_s=0.01, retry_wait_s=0.1, poll_timeout_s=0.2,
                         composition="rules_only")
PROMPT = PromptEvent(id="llm-judge-q", messages=[ChatMessage(role="user", content="What is 2+2?")], source="test")
ANSWERS = ["4", "2+2 is 5.", "I like turtles."]


@pytest.fixture(scope="module")
def gateway_v1(vllm_server, model_dir, vllm_store, broker):
    register_base(vllm_server.url, model_dir, vllm_store)
    settings = GatewaySettings(vllm_url=vllm_server.url, mirror_fraction=0.0)
    with running_gateway(settings, CommonSettings(bootstrap_servers=broker.bootstrap)) as url:
        yield f"{url}/v1"


def direct_letter(url: str, prompt: PromptEvent, a: str, b: str) -> str | None:
    """What the judge should read for (a, b): the same request, sent by hand."""
    content = SETTINGS.llm_judge_template.format(prompt=render_prompt(prompt), a=a, b=b)
    resp = httpx.post(f"{url}/chat/completions", timeout=120, json={
        "model": "base", "messages": [{"role": "user", "content": content}], "temperature": 0.0, "max_tokens": 8})
    resp.raise_for_status()
    m = re.search(SETTINGS.llm_judge_verdict_regex, resp.json()["choices"][0]["message"]["content"])
    return m.group(1) if m else None


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_combine_needs_the_same_winner_in_both_orders():
    assert combine("A", "B") == (1, "consistent")      # a shown first wins, and wins again shown second
    assert combine("B", "A") == (-1, "consistent")
    assert combine("A", "A") == (0, "inconsistent")    # the first position won both times: bias, a tie
    assert combine("B", "B") == (0, "inconsistent")
    assert combine(None, "A") == (0, "no_verdict")


def test_llm_judge_asks_both_orders_and_turns_position_bias_into_ties(gateway_v1):
    judge = LlmJudge.from_settings(SETTINGS.model_copy(update={"llm_judge_url": gateway_v1}))
    outcomes = {o: metric("odpo_judge_llm_comparisons_total", outcome=o)
                for o in ("consistent", "inconsistent", "no_verdict")}
    judgement = judge.judge(PROMPT, ANSWERS)

    expected: dict[tuple[int, int], int] = {}
    seen_outcomes = []
    for i, j in itertools.combinations(range(3), 2):
        first = direct_letter(gateway_v1, PROMPT, ANSWERS[i], ANSWERS[j])
        second = direct_letter(gateway_v1, PROMPT, ANSWERS[j], ANSWERS[i])  # the swapped order
        expected[(i, j)], outcome = combine(first, second)
        seen_outcomes.append(outcome)
    assert judgement.verdicts == expected
    wins = [0.0] * 3
    for (i, j), v in expected.items():  # round-robin: a win is 1, a tie half for each
        wins[i] += (v + 1) / 2
        wins[j] += (1 - v) / 2
    assert judgement.scores == pytest.approx([w / 2 for w in wins])
    # This model answers by position for the 2+2 question (measured: "The answer is B." in both orders).
    assert "inconsistent" in seen_outcomes
    for o in outcomes:
        assert metric("odpo_judge_llm_comparisons_total", outcome=o) - outcomes[o] == seen_outcomes.count(o)
    assert judge.compare(PROMPT, ANSWERS[0], ANSWERS[1]) == expected[(0, 1)]
    asked = metric("odpo_judge_llm_comparisons_total", outcome=seen_outcomes[0])
    assert judge.judge(PROMPT, ["4", "4"]).verdicts == {(0, 1): 0}  # the same text twice: a tie, nothing asked
    assert metric("odpo_judge_llm_comparisons_total", outcome=seen_outcomes[0]) == asked
    judge.close()


def test_judge_loop_puts_a_batch_back_while_the_endpoint_is_down(gateway_v1, broker, producer, group_id):
    """Endpoint down: nothing published, nothing dead-lettered, nothing committed; once up, the same set is judged."""
    run_id = uuid.uuid4().hex[:8]
    settings = SETTINGS.model_copy(update={"llm_judge_url": f"http://127.0.0.1:{free_port()}/v1"})
    judge = LlmJudge.from_settings(settings)
    with pytest.raises(JudgeUnavailable, match="failed 2 times"):
        judge.ask(PROMPT, "a", "b")

    topic = f"test.candidates.{run_id}"  # its own topic: only this set, whatever other tests left on the shared one
    ensure_topics(broker.bootstrap, [topic])
    cset = candidate_set(f"{run_id}-llm", ["4", "2+2 is 5."], task={"kind": "none"})
    producer.send(topic, key=cset.prompt.id.encode(), value=cset.to_bytes()).get(timeout=30)
    unavailable = metric("odpo_judge_unavailable_total")
    inbox = Inbox(broker.bootstrap, topic, CandidateSet, "judge", producer, group_id=group_id)
    loop = JudgeLoop(inbox, producer, settings, judge=judge, stop=threading.Event())
    tp = TopicPartition(topic, 0)
    try:
        for _ in range(200):  # join the group, read the set, fail on it
            loop.step()
            if metric("odpo_judge_unavailable_total") > unavailable:
                break
        assert metric("odpo_judge_unavailable_total") == unavailable + 1
        assert inbox.dead_lettered == 0 and inbox.consumer.committed(tp) in (None, 0)

        judge.client.base_url = gateway_v1  # the endpoint is back
        sets_before = metric("odpo_judge_candidate_sets_total")
        for _ in range(50):
            loop.step()
            if metric("odpo_judge_candidate_sets_total") > sets_before:
                break
        assert metric("odpo_judge_candidate_sets_total") == sets_before + 1, "the put-back set was judged again"
        assert inbox.dead_lettered == 0 and inbox.consumer.committed(tp) == 1
    finally:
        inbox.close()
        judge.close()


def test_llm_judge_service_publishes_a_verdict_that_survives_the_swap(gateway_v1, broker, producer):
    """A template whose verdict follows content, not position: the model repeats the answer shown first
    ("Repeat after me: A" -> "A: A", "Repeat after me: B" -> "B.B..."), and the verdict is the letter it
    starts with. So the response "A" wins whichever order it is shown in: consistent, and a pair."""
    run_id = uuid.uuid4().hex[:8]
    topic = f"test.candidates.{run_id}"
    ensure_topics(broker.bootstrap, [topic])
    settings = SETTINGS.model_copy(update={
        "llm_judge_url": gateway_v1, "llm_judge_template": "Repeat after me: {a}{prompt:.0}{b:.0}",
        "llm_judge_verdict_regex": r"^\s*([AB])\b", "llm_judge_concurrency": 2})
    cset = candidate_set(f"{run_id}-echo", ["B", "A"], task={})
    last = producer.send(topic, key=cset.prompt.id.encode(), value=cset.to_bytes()).get(timeout=30).offset
    consistent = metric("odpo_judge_llm_comparisons_total", outcome="consistent")
    judge_all(broker, producer, topic, last + 1, settings, group_id=f"test-{run_id}")
    mine = lambda r: r.key == cset.prompt.id.encode()
    (record,) = read_until(broker.bootstrap, TOPIC_PREFERENCES, mine, lambda found: len(found) >= 1)
    pair = PreferencePair.from_bytes(record.value)
    assert (pair.chosen, pair.rejected, pair.judge) == ("A", "B", "llm_judge")
    assert (pair.chosen_score, pair.rejected_score) == (1.0, 0.0)
    assert metric("odpo_judge_llm_comparisons_total", outcome="consistent") == consistent + 1
    assert 0 < metric("odpo_judge_llm_position_consistency_ratio") <= 1
