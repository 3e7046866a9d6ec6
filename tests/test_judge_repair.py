"""Repair pairs: the best sampled answer with what its prompt asked done to it, preferred over it as sampled."""

from __future__ import annotations

import json

import pytest

from judge.registry import make_judge
from judge.pairs import REPAIR_SUFFIX, PairPolicy, repair_pair
from judge.repair import repair, sentences
from judge.rule_judge import RuleJudge
from judge.text import words
from judge.verifier import score_constraints, strict_pass
from core.contracts import CandidateSet, ChatMessage, Completion, PreferencePair, PromptEvent, SamplingParams
from core.settings import JudgeSettings

ANSWER = ("The river runs to the sea, past old mills and quiet towns. Fish swim in its cold water. "
          "Children play on its banks in summer. At night the water shines under the moon.")
OTHER = "A river is fresh water that flows downhill. It carves valleys over many years."
TOPIC = {"type": "on_topic", "words": ["river", "rivers"]}


def task(*constraints: dict) -> dict:
    return {"kind": "constraints", "constraints": [*constraints, TOPIC]}


EDITS = [
    {"type": "lowercase"}, {"type": "uppercase"}, {"type": "no_commas"},
    {"type": "end_with", "phrase": "That is all."}, {"type": "start_with", "phrase": "Sure"},
    {"type": "start_with", "phrase": "Here is my answer"},
    {"type": "repeat_request", "text": "Describe a river."}, {"type": "title"}, {"type": "quoted"}, {"type": "json"},
    {"type": "highlights", "n": 2}, {"type": "postscript", "marker": "P.S."},
    {"type": "bullet_points", "n": 3, "min_words": 3}, {"type": "numbered_list", "n": 3},
    {"type": "paragraphs", "n": 2}, {"type": "sections", "n": 2, "marker": "Part"},
    {"type": "max_sentences", "n": 2}, {"type": "max_words", "n": 20}, {"type": "forbid_word", "word": "cold"},
    {"type": "two_responses"},
]


@pytest.mark.parametrize("constraint", EDITS, ids=lambda c: c["type"])
def test_each_edit_meets_its_constraint_and_keeps_the_answer(constraint):
    t = task(constraint)
    assert not strict_pass(t, ANSWER)
    fixed = repair(t, ANSWER, [OTHER])
    assert fixed is not None
    assert strict_pass(t, fixed), (fixed, score_constraints(t, fixed))
    # the answer's own words stay (edits add markers, phrases and a title; trims keep whole sentences)
    assert "the river runs to the sea past old mills" in " ".join(words(fixed)).lower(), fixed


def test_the_edits_of_a_prompt_compose():
    t = task({"type": "start_with", "phrase": "Well"}, {"type": "bullet_points", "n": 4, "min_words": 3},
             {"type": "no_commas"}, {"type": "lowercase"}, {"type": "highlights", "n": 1})
    fixed = repair(t, ANSWER)
    assert strict_pass(t, fixed), fixed
    assert fixed.startswith("well\n- *the river runs to the sea past old mills")  # the phrase on its own line
    t = task({"type": "postscript", "marker": "P.P.S."}, {"type": "sections", "n": 2, "marker": "Section"},
             {"type": "quoted"})
    fixed = repair(t, ANSWER)
    assert strict_pass(t, fixed) and fixed.rstrip('"').endswith("P.P.S. At night the water shines under the moon.")
    assert json.loads(repair(task({"type": "json"}), ANSWER))["answer"].startswith("The river runs")


def test_content_the_model_must_write_is_not_invented():
    for c in ({"type": "include_word", "word": "bridge"}, {"type": "keyword_count", "word": "time", "n": 2},
              {"type": "placeholders", "n": 2}, {"type": "min_words", "n": 80}):
        assert repair(task(c), ANSWER) is None, c
    assert repair(task({"type": "lowercase"}), ANSWER.lower()) is None  # nothing left to do
    # a layout needs as many sentences as parts: with fewer it is left as it was
    short = "The river is long and wide."
    assert repair(task({"type": "numbered_list", "n": 3}), short) is None


def test_an_answer_cut_by_the_token_limit_loses_its_unfinished_sentence_only_where_something_follows():
    cut = "The river runs to the sea. Fish swim in its cold water and the"
    assert repair(task({"type": "end_with", "phrase": "That is all."}), cut) == \
        "The river runs to the sea. That is all."
    assert repair(task({"type": "uppercase"}), cut) == cut.upper()  # the minimal edit: the case alone
    assert sentences("1. The sea.\n2. Is wide") == ["The sea.", "Is wide"]


def _cset(texts: list[str], t: dict) -> CandidateSet:
    prompt = PromptEvent(id="train-f0007", messages=[ChatMessage(role="user", content="Describe a river.")], task=t,
                         source="test")
    comps = [Completion(text=x, token_ids=[10 + i, 2], logprobs=[-0.5, -0.1], finish_reason="stop")
             for i, x in enumerate(texts)]
    return CandidateSet(prompt=prompt, prompt_token_ids=[1, 5], completions=comps, policy_version=3,
                        sampling=SamplingParams(n=len(texts), temperature=1.0, top_p=1.0, max_tokens=48))


def test_the_repair_pair_prefers_the_edited_best_answer(model_dir):
    from transformers import AutoTokenizer

    from trainer.tokenize import tokenize_pair

    t = task({"type": "no_commas"}, {"type": "lowercase"})
    worst = "Rivers, Rivers, Rivers, Rivers, Rivers, Rivers."
    cs = _cset([worst, ANSWER], t)
    judge = RuleJudge()
    pair, why = repair_pair(cs, judge.judge(cs.prompt, [worst, ANSWER]), judge, PairPolicy())
    assert why is None
    assert pair.rejected == ANSWER and pair.chosen == ANSWER.lower().replace(",", "")
    assert pair.judge == "verifier" + REPAIR_SUFFIX and pair.policy_version == 3
    assert pair.chosen_score == 1.0 and pair.margin > 0
    assert not pair.has_token_ids and pair.chosen_logprobs is None  # never sampled: no sampler ids or log-probs
    assert PreferencePair.from_bytes(pair.to_bytes()) == pair
    # the trainer tokenizes both sides through the chat template, as the generator prompted the model
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenize_pair(pair, tok, 512)
    assert tok.decode(ids.chosen_ids).startswith(pair.chosen)
    assert tok.decode(ids.prompt_ids).endswith("Describe a river.<|im_end|>\n<|im_start|>assistant\n")


def test_a_repair_the_judge_does_not_score_higher_is_not_published():
    # the sentence limit keeps the first sentence, which loses the topic: no better than the answer as sampled
    t = task({"type": "max_sentences", "n": 1})
    answer = "It is cold and quiet. The river runs under the ice."
    cs = _cset([answer, "Snow falls. Ice forms. Wind blows."], t)
    judge = RuleJudge()
    assert repair_pair(cs, judge.judge(cs.prompt, [c.text for c in cs.completions]), judge, PairPolicy()) == \
        (None, "repair")
    # cut to a degenerate answer ("Yes."): the quality guard fails it, so it is never chosen
    guarded = make_judge(JudgeSettings(reference_logprob=False))
    cs = _cset(["Yes. The river is long and wide and it runs down to the sea.", "No."], t)
    assert repair_pair(cs, guarded.judge(cs.prompt, [c.text for c in cs.completions]), guarded, PairPolicy()) == \
        (None, "repair")
    # a task the verifier does not judge: nothing to repair
    cs = _cset([answer, "no"], {"kind": "regex", "pattern": "river"})
    assert repair_pair(cs, RuleJudge().judge(cs.prompt, [answer, "no"]), RuleJudge(), PairPolicy()) == (None, None)
