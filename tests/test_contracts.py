import json

import pytest
from pydantic import ValidationError

from core.contracts import (AdapterReady, CandidateSet, Completion, DeadLetter, Feedback, PreferencePair,
                               PromptEvent, SamplingParams, TrainMetrics, pair_id, parse_version_name, version_name)

PROMPT = PromptEvent(id="p1", messages=[{"role": "user", "content": "Say hi."}])


def _completion(ids, text="x"):
    return Completion(text=text, token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason="stop")


def test_prompt_needs_exactly_one_form():
    with pytest.raises(ValidationError, match="exactly one"):
        PromptEvent(id="p", text="hi", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValidationError, match="exactly one"):
        PromptEvent(id="p")
    with pytest.raises(ValidationError, match="blank"):
        PromptEvent(id="p", text="   ")
    with pytest.raises(ValidationError, match="user turn"):
        PromptEvent(id="p", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValidationError):
        PromptEvent(id="", text="hi")


def test_round_trip_and_schema_version():
    raw = PROMPT.to_bytes()
    assert json.loads(raw)["schema_version"] == 1
    assert PromptEvent.from_bytes(raw) == PROMPT
    with pytest.raises(ValidationError):
        PromptEvent.from_bytes(raw.replace(b'"schema_version":1', b'"schema_version":2'))
    with pytest.raises(ValidationError):  # unknown fields are refused, not silently dropped
        PromptEvent.model_validate({**json.loads(raw), "surprise": 1})


def test_completion_token_ids_and_logprobs():
    with pytest.raises(ValidationError):
        _completion([1, -2])
    with pytest.raises(ValidationError, match="logprobs for"):
        Completion(text="x", token_ids=[1, 2], logprobs=[-1.0])
    with pytest.raises(ValidationError, match="<= 0"):
        Completion(text="x", token_ids=[1], logprobs=[0.5])


def test_candidate_set_needs_two_completions():
    sp = SamplingParams(n=2, temperature=1, top_p=1, max_tokens=8)
    ok = CandidateSet(prompt=PROMPT, prompt_token_ids=[1, 2], completions=[_completion([3]), _completion([4])],
                      policy_version=0, sampling=sp)
    assert CandidateSet.from_bytes(ok.to_bytes()) == ok
    with pytest.raises(ValidationError):
        CandidateSet(prompt=PROMPT, prompt_token_ids=[1], completions=[_completion([3])], policy_version=0,
                     sampling=sp)


def test_pair_id_is_deterministic_and_sensitive():
    a = pair_id("p1", "good", "bad", 3)
    assert a == pair_id("p1", "good", "bad", 3)
    assert len({a, pair_id("p1", "bad", "good", 3), pair_id("p1", "good", "bad", 4), pair_id("p2", "good", "bad", 3)}) == 4


def test_preference_pair_validation():
    base = dict(id="x", prompt=PROMPT, policy_version=0, judge="verifier")
    with pytest.raises(ValidationError, match="identical"):
        PreferencePair(chosen="same", rejected="same", **base)
    with pytest.raises(ValidationError, match="together"):
        PreferencePair(chosen="a", rejected="b", prompt_token_ids=[1], **base)
    with pytest.raises(ValidationError, match="align"):
        PreferencePair(chosen="a", rejected="b", prompt_token_ids=[1], chosen_token_ids=[2], rejected_token_ids=[3],
                       chosen_logprobs=[-1.0, -2.0], **base)
    pair = PreferencePair(chosen="a", rejected="b", prompt_token_ids=[1], chosen_token_ids=[2], rejected_token_ids=[3],
                          **base)
    assert pair.has_token_ids and not PreferencePair(chosen="a", rejected="b", **base).has_token_ids


def test_adapter_ready_rules():
    m = TrainMetrics(loss=0.6, reward_margin=0.1, reward_accuracy=0.5, steps=4)
    ok = dict(version=2, path="policy-v2", sha256="a" * 64, base_model="m", parent_version=1, pairs_trained=16, metrics=m)
    assert AdapterReady(**ok).version == 2
    for bad in ({"path": "/etc/passwd"}, {"path": "../x"}, {"sha256": "xyz"}, {"parent_version": 2}, {"version": 0}):
        with pytest.raises(ValidationError):
            AdapterReady(**{**ok, **bad})


def test_feedback_forms():
    assert Feedback(response_id="r", rating=1).rating == 1
    assert Feedback(response_id="r", other_response_id="s", preferred="other").preferred == "other"
    for bad in ({}, {"rating": 2}, {"rating": 1, "other_response_id": "s", "preferred": "this"},
                {"other_response_id": "s"}):
        with pytest.raises(ValidationError):
            Feedback(response_id="r", **bad)


def test_dead_letter_keeps_payload():
    d = DeadLetter(source_topic="odpo.prompts", partition=0, offset=7, payload="{bad", error="why", component="c")
    assert DeadLetter.from_bytes(d.to_bytes()).payload == "{bad"


def test_version_names():
    assert version_name(0) == "base" and version_name(12) == "policy-v12"
    assert parse_version_name("policy-v12") == 12 and parse_version_name("base") == 0
    for name in ("policy", "policy-v0", "policy-v01", "policy-vx", "other"):
        assert parse_version_name(name) is None
    with pytest.raises(ValueError):
        version_name(-1)
