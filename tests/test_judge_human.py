"""The human judge: client feedback (as the gateway publishes it) to preference pairs on odpo.preferences."""

from __future__ import annotations

import threading
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition

from judge.feedback import FeedbackPairer, prompt_key
from judge.service import run
from core.contracts import (
    TOPIC_DLQ,
    TOPIC_FEEDBACK,
    TOPIC_PREFERENCES,
    ChatMessage,
    DeadLetter,
    Feedback,
    PreferencePair,
    PromptEvent,
    ServedResponse,
    pair_id,
)
from core.settings import CommonSettings, JudgeSettings
from tests.test_judge_service import read_until


def prompt(prompt_id: str, content: str = "Name a color.") -> PromptEvent:
    """A served request as the gateway records it: every request gets its own id."""
    return PromptEvent(id=prompt_id, messages=[ChatMessage(role="user", content=content)], source="gateway")


def rating(rid: str, text: str, value: float, pid: str, content: str = "Name a color.", version: int = 1) -> Feedback:
    return Feedback(response_id=rid, rating=value, prompt=prompt(pid, content),
                    response=ServedResponse(id=rid, text=text, policy_version=version))


def choice(rid: str, text: str, other_rid: str, other_text: str, preferred: str, pid: str,
           versions: tuple[int, int] = (2, 1)) -> Feedback:
    return Feedback(response_id=rid, other_response_id=other_rid, preferred=preferred, prompt=prompt(pid),
                    response=ServedResponse(id=rid, text=text, policy_version=versions[0]),
                    other_response=ServedResponse(id=other_rid, text=other_text, policy_version=versions[1]))


def test_a_choice_is_a_pair_at_once():
    pairer = FeedbackPairer()
    (p,), dropped = pairer.add(choice("r1", "Blue.", "r2", "I cannot answer.", "this", "gw-1"))
    assert (p.chosen, p.rejected, p.judge, p.policy_version) == ("Blue.", "I cannot answer.", "human", 1)
    assert p.id == pair_id("gw-1", "Blue.", "I cannot answer.", 1) and not p.has_token_ids and dropped == []
    (q,), _ = pairer.add(choice("r1", "Blue.", "r2", "I cannot answer.", "other", "gw-1"))
    assert (q.chosen, q.rejected) == ("I cannot answer.", "Blue.")
    assert pairer.add(choice("r1", "Blue.", "r2", "Blue.", "this", "gw-1")) == ([], ["identical"])
    assert len(pairer) == 0


def test_ratings_pair_a_liked_with_a_disliked_answer_to_the_same_prompt():
    pairer = FeedbackPairer()
    assert pairer.add(rating("r1", "Red.", 1.0, "gw-1"), offset=10) == ([], [])
    assert pairer.add(rating("r2", "Green.", 0.5, "gw-2"), offset=11) == ([], [])       # both liked: wait
    assert pairer.add(rating("r9", "Other.", -1, "gw-9", content="Name a fruit."), offset=12) == ([], [])
    assert pairer.lowest_offsets() == {0: 10}
    (p,), _ = pairer.add(rating("r3", "No idea.", -0.5, "gw-3"), offset=13)  # same content, its own id
    assert (p.chosen, p.rejected) == ("Red.", "No idea.")                     # first liked, first paired
    assert (p.chosen_score, p.rejected_score, p.margin) == (1.0, -0.5, 1.5) and p.prompt.id == "gw-1"
    assert pairer.lowest_offsets() == {0: 11} and len(pairer) == 2
    assert pairer.add(rating("r4", "Hmm.", 0.0, "gw-4"), offset=14) == ([], ["neutral"])
    (q,), _ = pairer.add(rating("r5", "Purple!", -1, "gw-5"), offset=15)
    assert (q.chosen, q.rejected) == ("Green.", "Purple!")
    assert pairer.lowest_offsets() == {0: 12}  # only the fruit rating still waits


def test_a_re_rated_response_counts_with_its_newest_rating():
    pairer = FeedbackPairer()
    pairer.add(rating("r1", "Red.", 1.0, "gw-1"))
    pairer.add(rating("r1", "Red.", -1.0, "gw-1"))   # changed their mind: now a disliked answer, not a pair with itself
    assert len(pairer) == 1
    (p,), _ = pairer.add(rating("r2", "Blue.", 1.0, "gw-2"))
    assert (p.chosen, p.rejected) == ("Blue.", "Red.")
    pairer.add(rating("r3", "Teal.", 1.0, "gw-3"))
    assert pairer.add(rating("r3", "Teal.", 0.0, "gw-3")) == ([], ["neutral"]) and len(pairer) == 0  # withdrawn


def test_the_buffer_is_bounded():
    pairer = FeedbackPairer(max_prompts=2, max_per_prompt=2, max_age_s=60)
    for i in range(3):
        _, dropped = pairer.add(rating(f"a{i}", f"text {i}", 1, f"gw-a{i}", content="Prompt A."), now=0)
    assert dropped == ["evicted"] and len(pairer) == 2   # third liked answer to one prompt: the oldest goes
    pairer.add(rating("b", "b", 1, "gw-b", content="Prompt B."), now=10)
    _, dropped = pairer.add(rating("c", "c", 1, "gw-c", content="Prompt C."), now=20)
    assert dropped == ["evicted", "evicted"] and len(pairer) == 2   # prompt A, least recently rated, goes
    assert pairer.evict_old(now=75) == 1 and len(pairer) == 1       # b is 65 s old
    assert prompt_key(prompt("x", "Prompt C.")) == prompt_key(prompt("y", "Prompt C."))


def test_feedback_without_the_served_texts_is_unusable():
    with pytest.raises(ValueError, match="gateway fills"):
        FeedbackPairer().add(Feedback(response_id="r1", rating=1.0))
    bare = Feedback(response_id="r1", other_response_id="r2", preferred="this", prompt=prompt("gw-1"),
                    response=ServedResponse(id="r1", text="x", policy_version=0))
    with pytest.raises(ValueError, match="other served response"):
        FeedbackPairer().add(bare)


def test_human_judge_turns_published_feedback_into_pairs(broker, producer, group_id):
    run_id = uuid.uuid4().hex[:8]
    pid = lambda k: f"gw-{run_id}-{k}"
    messages = [
        (pid("c"), choice(f"{run_id}-r1", "Blue.", f"{run_id}-r2", "Colors are hard.", "this", pid("c")).to_bytes()),
        (pid("1"), rating(f"{run_id}-r3", "Red.", 1.0, pid("1"), content=f"Name a color {run_id}.").to_bytes()),
        (pid("x"), b'{"response_id": "r", "rating": 7}'),                                 # invalid: rating > 1
        (pid("y"), Feedback(response_id=f"{run_id}-r5", rating=-1.0).to_bytes()),          # no served texts
        (pid("2"), rating(f"{run_id}-r4", "idk", -1.0, pid("2"), content=f"Name a color {run_id}.").to_bytes()),
        (pid("w"), rating(f"{run_id}-r6", "Waiting.", 0.5, pid("w"), content=f"Lonely {run_id}.").to_bytes()),
    ]
    offsets = [producer.send(TOPIC_FEEDBACK, key=k.encode(), value=v).get(timeout=30).offset for k, v in messages]

    stop = threading.Event()
    settings = JudgeSettings(judge="human", feedback_group_id=group_id, poll_timeout_s=0.2)
    thread = threading.Thread(target=run, args=(CommonSettings(bootstrap_servers=broker.bootstrap), settings, stop),
                              daemon=True)
    thread.start()
    try:
        mine = lambda r: r.key is not None and r.key.decode().startswith(f"gw-{run_id}")
        pair_records = read_until(broker.bootstrap, TOPIC_PREFERENCES, mine, lambda found: len(found) >= 2)
        dead = read_until(broker.bootstrap, TOPIC_DLQ, mine, lambda found: len(found) >= 2)
        check = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group_id, enable_auto_commit=False)
        try:
            committed = None
            for _ in range(100):  # the commit follows the produce; wait for it
                committed = check.committed(TopicPartition(TOPIC_FEEDBACK, 0))
                if committed is not None and committed >= offsets[-1]:
                    break
                stop.wait(0.1)
        finally:
            check.close()
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive()

    pairs = {r.key.decode(): PreferencePair.from_bytes(r.value) for r in pair_records}
    assert set(pairs) == {pid("c"), pid("1")}
    assert (pairs[pid("c")].chosen, pairs[pid("c")].rejected, pairs[pid("c")].policy_version) == \
        ("Blue.", "Colors are hard.", 1)
    assert (pairs[pid("1")].chosen, pairs[pid("1")].rejected, pairs[pid("1")].judge) == ("Red.", "idk", "human")
    letters = {r.key.decode(): DeadLetter.from_bytes(r.value) for r in dead}
    assert set(letters) == {pid("x"), pid("y")}
    assert "invalid Feedback" in letters[pid("x")].error and "gateway fills" in letters[pid("y")].error
    # The lonely rating still waits in memory: the commit stops right before it, so a restart re-reads it.
    assert committed == offsets[-1]


@pytest.mark.vllm
def test_feedback_through_the_gateway_ends_as_pairs(vllm_server, model_dir, vllm_store, broker, group_id):
    """Served by the real gateway (vLLM behind it), judged by a client on /v1/feedback, paired by the human judge."""
    import httpx

    from core.settings import GatewaySettings
    from tests.gateway_server import register_base, running_gateway

    register_base(vllm_server.url, model_dir, vllm_store)
    question = [{"role": "user", "content": f"Name a color. ({uuid.uuid4().hex[:6]})"}]
    stop = threading.Event()
    settings = JudgeSettings(judge="human", feedback_group_id=group_id, poll_timeout_s=0.2)
    common = CommonSettings(bootstrap_servers=broker.bootstrap)
    judge = threading.Thread(target=run, args=(common, settings, stop), daemon=True)
    with running_gateway(GatewaySettings(vllm_url=vllm_server.url, mirror_fraction=0.0), common) as url:
        def ask(seed: int) -> tuple[str, str]:
            body = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": "base", "messages": question, "max_tokens": 12, "temperature": 1.0, "seed": seed}).json()
            return body["id"], body["choices"][0]["message"]["content"]

        answers = {}
        for seed in range(1, 8):  # sampled: collect three different texts
            rid, text = ask(seed)
            if text not in answers.values():
                answers[rid] = text
            if len(answers) == 3:
                break
        (a, ta), (b, tb), (c, tc) = answers.items()
        feedback = [{"response_id": a, "other_response_id": b, "preferred": "other"},
                    {"response_id": a, "rating": 1.0}, {"response_id": c, "rating": -0.5}]
        for body in feedback:
            resp = httpx.post(f"{url}/v1/feedback", json=body, timeout=30)
            assert resp.status_code == 202, resp.text
        prompt_ids = {httpx.post(f"{url}/v1/feedback", json={"response_id": r, "rating": 0.0}, timeout=30)
                      .json()["prompt_id"] for r in (a, b, c)}  # neutral: no pair, but tells the prompt ids
    judge.start()
    try:
        mine = lambda r: r.key is not None and r.key.decode() in prompt_ids
        records = read_until(broker.bootstrap, TOPIC_PREFERENCES, mine, lambda found: len(found) >= 2)
    finally:
        stop.set()
        judge.join(timeout=20)
    pairs = {(p.chosen, p.rejected) for p in (PreferencePair.from_bytes(r.value) for r in records)}
    assert pairs == {(tb, ta), (ta, tc)}  # the choice, and the liked answer against the disliked one
