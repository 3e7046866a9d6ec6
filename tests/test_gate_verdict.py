"""The gate's verdict on evaluation rows: the paired score interval, the tolerance, and the quality limits."""

from __future__ import annotations

import random

from judge.signals import score_answers
from service.gate.verdict import judge_version
from core.settings import GateSettings
from service.task import make_prompts

LIMITS = GateSettings().gate_limits()
PROMPTS = make_prompts("heldout", 60)


def _answer(p, words: int = 14) -> str:
    topic = p.task["constraints"][-1]["words"][0]  # the on_topic constraint's first word
    filler = "it is calm and quiet here and people like to spend a long slow day there with friends".split()
    return " ".join([f"the {topic} is lovely"] + filler[:max(0, words - 4)]) + "."


def _rows(answers):
    return score_answers(PROMPTS, answers)


def test_identical_answers_pass_with_a_point_interval():
    rows = _rows([_answer(p) for p in PROMPTS])
    v = judge_version(rows, rows, rows, 0.05, LIMITS)
    assert v.passed and v.conclusive and v.difference.low == v.difference.high == 0.0


def test_one_word_answers_are_refused_by_length_and_name_the_reference():
    good = _rows([_answer(p) for p in PROMPTS])
    hacked = _rows(["no" for _ in PROMPTS])
    v = judge_version(hacked, good, None, 0.05, LIMITS, "policy-v3")
    assert not v.passed and v.signal == "mean_words" and "policy-v3" in v.reason
    # Against base too: a promoted version that already drifted does not excuse the next one.
    shorter = _rows([_answer(p, 6) for p in PROMPTS])
    v = judge_version(shorter, shorter, good, 0.05, LIMITS, "policy-v3")
    assert not v.passed and v.signal == "mean_words" and "base" in v.reason


def test_off_topic_answers_are_refused_by_topic_share():
    good = _rows([_answer(p) for p in PROMPTS])
    off = _rows([_answer(p).replace(p.task["constraints"][-1]["words"][0], "weather")
                 if i % 3 == 0 else _answer(p) for i, p in enumerate(PROMPTS)])
    v = judge_version(off, good, good, 0.05, LIMITS)
    assert not v.passed and v.signal == "on_topic_share", v.reason


def test_a_worse_score_is_refused_and_a_noisy_small_sample_is_inconclusive():
    good = [_answer(p) for p in PROMPTS]
    worse = [a.upper() if i % 2 else a for i, a in enumerate(good)]  # breaks "lowercase" on half the prompts
    v = judge_version(_rows(worse), _rows(good), None, 0.05, LIMITS)
    assert not v.passed and v.signal == "score" and v.difference.high < 0
    rng = random.Random(0)
    mixed = [a.upper() if rng.random() < 0.3 else a for a in good[:8]]
    small = judge_version(score_answers(PROMPTS[:8], mixed), score_answers(PROMPTS[:8], good[:8]), None, 0.02,
                          LIMITS)
    assert not small.conclusive and small.difference.half_width > 0.02
    assert "still wider than the tolerance" in small.reason
