"""An answer that does what its prompt asks (lowercase, no commas) is preferred by the judge and passes the gate.

The base model (the packaged SmolLM2-135M, greedy) answers held-out prompts that ask for lowercase or no
commas; the obeying candidate is the same answer lowercased and without its commas. Scored raw, the base
model's log-prob per token of the obeying form is far lower (-0.39/-0.36 measured before; the fluency term and
the gate's drift limit punished obeying). The reference scorer now scores each answer's surface form
(judge/fluency.py), so the composite judge prefers the obeying answer and the gate passes it, while answers
that game the verifier ("no") are still refused.
"""

from __future__ import annotations

import pytest

from judge.base import chat_messages
from judge.registry import make_judge
from judge.fluency import ReferenceScorer
from judge.quality import GuardLimits
from judge.signals import score_answers, summarize
from service.gate.verdict import judge_version
from core.settings import GateSettings, JudgeSettings
from service.task import make_prompts

N_PROMPTS = 8


def _obeying(prompt, text: str) -> str:
    kinds = {c["type"] for c in prompt.task["constraints"]}
    if "lowercase" in kinds:
        text = text.lower()
    if "no_commas" in kinds:
        text = text.replace(",", "")
    return text


class _RawScorer:
    """The reference scorer as it was: the answer's tokens as written (the prompt's task hidden from it)."""

    def __init__(self, scorer: ReferenceScorer):
        self.scorer = scorer

    def logprob_per_token(self, prompt, texts):
        return self.scorer.logprob_per_token(prompt.model_copy(update={"task": {}}), texts)


@pytest.fixture(scope="module")
def answered(model_dir):
    """Held-out prompts whose base answer changes when made to obey, with base's greedy answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts, answers = [], []
    for p in make_prompts("heldout", 200):
        if not {c["type"] for c in p.task["constraints"]} & {"lowercase", "no_commas"}:
            continue
        ids = tok.apply_chat_template(chat_messages(p), add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=40, do_sample=False)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        if _obeying(p, answer) != answer:
            prompts.append(p)
            answers.append(answer)
        if len(prompts) == N_PROMPTS:
            break
    assert len(prompts) == N_PROMPTS
    return prompts, answers, ReferenceScorer(model_dir, threads=2)


def test_raw_fluency_punishes_obeying_and_the_surface_form_does_not(answered):
    prompts, answers, scorer = answered
    raw, normalised = _RawScorer(scorer), scorer
    raw_drop = [raw.logprob_per_token(p, [_obeying(p, a)])[0] - raw.logprob_per_token(p, [a])[0]
                for p, a in zip(prompts, answers)]
    assert sum(raw_drop) / len(raw_drop) < -0.15, raw_drop  # the problem is real on this model
    for p, a in zip(prompts, answers):
        original, obeying = normalised.logprob_per_token(p, [a, _obeying(p, a)])
        assert abs(obeying - original) < 0.05, (p.id, a)


def test_the_judge_prefers_the_obeying_answer(answered, model_dir):
    prompts, answers, _ = answered
    judge = make_judge(JudgeSettings(), model_dir)  # the default: verifier x quality guard, reference log-prob on
    try:
        preferred = 0
        for p, a in zip(prompts, answers):
            judged = judge.judge(p, [a, _obeying(p, a)])
            assert judged.scores[1] >= judged.scores[0], (p.id, a, judged)
            if judged.failures[0] is None:  # base answered the topic: the obeying answer wins the pair
                assert judged.failures[1] is None and judged.scores[1] > judged.scores[0], (p.id, a, judged)
                preferred += 1
            else:  # base's answer failed the guard (off topic: "I'm a helpful AI named SmolLM"); so does its copy
                assert judged.failures[1] == judged.failures[0], (p.id, a, judged)
        assert preferred >= 3, f"only {preferred} of {len(prompts)} base answers passed the guard"
    finally:
        judge.close()


def test_the_gate_passes_the_obeying_answers_and_still_refuses_a_hack(answered):
    prompts, answers, scorer = answered
    s = GateSettings()
    limits = GuardLimits()
    base = score_answers(prompts, answers, scorer, limits)
    obeying = score_answers(prompts, [_obeying(p, a) for p, a in zip(prompts, answers)], scorer, limits)
    verdict = judge_version(obeying, base, base, s.promotion_tolerance, s.gate_limits())
    assert verdict.passed, verdict.reason
    assert summarize(obeying)["score"] > summarize(base)["score"]

    # Scored raw, the same answers would have been refused for drift.
    raw = _RawScorer(scorer)
    raw_verdict = judge_version(score_answers(prompts, [_obeying(p, a) for p, a in zip(prompts, answers)], raw,
                                              limits),
                                score_answers(prompts, answers, raw, limits),
                                score_answers(prompts, answers, raw, limits), s.promotion_tolerance, s.gate_limits())
    assert not raw_verdict.passed and raw_verdict.signal == "ref_logprob", raw_verdict.reason

    hacked = score_answers(prompts, ["no"] * len(prompts), scorer, limits)  # what the rule verifier once taught
    refused = judge_version(hacked, base, base, s.promotion_tolerance, s.gate_limits())
    assert not refused.passed, refused.reason
