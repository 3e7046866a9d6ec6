"""The quality guard: each reason it fails an answer for, on real texts, at the edges of its limits; and the
reference model's log-probability that its `disfluent` reason and soft quality come from."""

from __future__ import annotations

import pytest

from judge.quality import GUARD_REASONS, GuardLimits, QualityGuard, distinct2, rule_failure
from core.contracts import ChatMessage, PromptEvent
from core.settings import JudgeSettings
from service.task import make_prompt

BEACH = make_prompt("heldout", 2)  # Tell me about the beach. lowercase, include "beautiful", on topic
SEA = {"kind": "constraints", "constraints": [{"type": "on_topic", "words": ["sea", "ocean"]}]}
NO_TOPIC = {"kind": "regex", "pattern": "sea"}


def failure(text: str, task=SEA, **limits) -> str | None:
    return rule_failure(text, task, GuardLimits(**limits))


def test_empty():
    for text in ("", "   \n", "...", "- \n- ", "!?"):
        assert failure(text) == "empty", repr(text)


def test_too_short_below_min_words():
    assert failure("no") == "too_short"
    assert failure("beautiful.", BEACH.task) == "too_short"
    assert failure("the sea is calm") == "too_short"  # 4 words < 5
    assert failure("the sea is calm today") is None  # 5 words: the edge passes
    assert failure("the sea is calm", min_words=4) is None
    assert failure("sea", min_words=1) is None


def test_repetitive_when_one_word_dominates():
    assert failure("sea sea sea sea sea sea") == "repetitive"
    assert failure("Sea sea SEA sea, sea!") == "repetitive"  # any case, any punctuation
    assert failure("sea sea sea the ocean is") is None  # 3 of 6: exactly the share, not more
    assert failure("sea sea sea sea the ocean is") == "repetitive"  # 4 of 7
    assert failure("sea sea sea sea the ocean is", max_word_share=0.6) is None
    assert failure("sea sea sea sea", min_words=3) == "repetitive"  # 4 words are enough to judge
    assert failure("sea sea sea", min_words=3) is None  # under 4 words the share is not judged


def test_repetitive_when_a_phrase_loops():
    looping = "the sea is blue the sea is blue the sea is blue"  # 4 distinct bigrams of 11, no word over 1/4
    assert distinct2(looping.split()) == pytest.approx(4 / 11)
    assert failure(looping) == "repetitive"
    eight = "the sea is the sea is the sea"  # 3 distinct bigrams of 7 (0.43)
    assert failure(eight, min_distinct2=0.45) == "repetitive"
    assert failure(eight, min_distinct2=0.4) is None
    seven = "the sea is the sea is the"  # 3 of 6 (0.5) < 0.6, but under 8 words the bigrams are not judged
    assert failure(seven, min_distinct2=0.6) is None
    assert failure("the sea is wide and deep and the waves roll in") is None
    assert distinct2(["sea"]) is None


def test_off_topic_when_the_task_names_its_topic():
    market = "the stock market fell sharply today as investors worried about rates"
    assert failure(market) == "off_topic"
    assert failure(market, off_topic=False) is None
    assert failure(market, NO_TOPIC) is None  # the task names no topic: nothing to check
    assert failure("The Ocean was calm and grey this morning") is None  # a topic word, any case
    assert failure("seashells lay along the quiet shore") == "off_topic"  # whole words only
    assert failure("no") == "too_short"  # the first reason that applies
    assert failure("beautiful beautiful beautiful beautiful", BEACH.task, min_words=1) == "repetitive"


def test_assessments_without_a_reference_model():
    texts = ["", "no", "beach beach beach beach beach beach", "the stock market fell sharply today",
             "the beach is beautiful with soft sand and warm blue water"]
    assessed = QualityGuard().assess(BEACH, texts)
    assert [a.failure for a in assessed] == ["empty", "too_short", "repetitive", "off_topic", None]
    assert [a.quality for a in assessed] == [0.0, 0.0, 0.0, 0.0, 1.0]  # no fluency term: a pass is quality 1
    assert all(a.ref_logprob is None for a in assessed)
    assert set(GUARD_REASONS) == {"empty", "too_short", "repetitive", "off_topic", "disfluent"}


def test_the_guard_defaults_are_the_service_defaults():
    s = JudgeSettings()
    assert GuardLimits() == GuardLimits(s.guard_min_words, s.guard_max_word_share, s.guard_min_distinct2,
                                        s.guard_off_topic, s.guard_min_ref_logprob, s.guard_good_ref_logprob)


# --- the reference model ----------------------------------------------------------------------------------------

FLUENT = "the beach is beautiful and the water is warm and clear today."
SALAD = "sand purple beach quickly beautiful fork the ninety under sing"  # on topic, no repeats, 10 words


@pytest.fixture(scope="module")
def reference(model_dir):
    from judge.fluency import ReferenceScorer

    return ReferenceScorer(model_dir, threads=2)


@pytest.mark.integration
def test_reference_logprob_is_the_mean_over_the_answer_tokens(reference):
    """Batched and padded the same as one by one, and equal to a forward pass over chat template + the answer's
    surface form (judge/fluency.py: what the prompt's constraints control normalised)."""
    import torch

    from judge.fluency import surface_form

    texts = [FLUENT, SALAD, "no", "the beach"]
    batched = reference.logprob_per_token(BEACH, texts)
    alone = [reference.logprob_per_token(BEACH, [t])[0] for t in texts]
    assert batched == pytest.approx(alone, abs=1e-4)
    tok, model = reference.tokenizer, reference.model
    head = tok.apply_chat_template([{"role": "user", "content": BEACH.messages[0].content}],
                                   add_generation_prompt=True, tokenize=False)
    assert head.endswith("<|im_start|>assistant\n")
    ids = tok(head, add_special_tokens=False)["input_ids"]
    body = tok(surface_form(BEACH.task, FLUENT), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids + body])).logits[0].float(), -1)
    expected = sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(body)) / len(body)
    assert batched[0] == pytest.approx(expected, abs=1e-4)
    assert batched[0] > -3.5 > -5.0 > batched[1]  # fluent well above salad


@pytest.mark.integration
def test_word_salad_fails_as_disfluent(reference):
    guard = QualityGuard(GuardLimits(), reference)
    fluent, salad, short, empty = guard.assess(BEACH, [FLUENT, SALAD, "no", ""])
    assert rule_failure(SALAD, BEACH.task, GuardLimits()) is None  # no rule catches it
    assert salad.failure == "disfluent" and salad.quality == 0.0 and salad.ref_logprob < -4.0
    assert fluent.failure is None and 0.0 < fluent.quality <= 1.0
    assert fluent.quality == pytest.approx((fluent.ref_logprob + 4.0) / 3.0)  # linear from -4 (0) to -1 (1)
    assert short.failure == "too_short" and short.ref_logprob is not None  # scored, the rule reason kept
    assert empty.failure == "empty" and empty.ref_logprob is None  # nothing to score


@pytest.mark.integration
def test_the_edges_of_the_fluency_limits(reference):
    (lp,) = reference.logprob_per_token(BEACH, [FLUENT])

    def assess(**limits):
        return QualityGuard(GuardLimits(**limits), reference).assess(BEACH, [FLUENT])[0]

    assert assess(min_ref_logprob=lp + 0.01).failure == "disfluent"
    edge = assess(min_ref_logprob=lp - 0.01, good_ref_logprob=lp + 0.99)
    assert edge.failure is None and edge.quality == pytest.approx(0.01)
    assert assess(min_ref_logprob=lp - 1.0, good_ref_logprob=lp).quality == 1.0  # at the good end
    assert assess(min_ref_logprob=lp - 3.0, good_ref_logprob=lp - 1.0).quality == 1.0  # capped above it
    assert assess(min_ref_logprob=lp - 1.0, good_ref_logprob=lp + 1.0).quality == pytest.approx(0.5)


@pytest.mark.integration
def test_the_prompt_decides_what_is_fluent(reference):
    """Log-probability of the answer to this prompt: a fluent sentence about something else reads as unlikely."""
    market = "the stock market fell sharply today as investors worried about rates."
    stocks = PromptEvent(id="stocks", messages=[ChatMessage(role="user", content="Tell me about the stock market.")])
    on_beach = reference.logprob_per_token(BEACH, [market])[0]
    on_market = reference.logprob_per_token(stocks, [market])[0]
    assert on_market > on_beach + 0.5  # measured: about -5.2 against -6.2


def test_cached_scorer_asks_each_prompt_answer_once():
    from judge.fluency import CachedScorer

    asked = []

    class Counting:
        def logprob_per_token(self, prompt, texts):
            asked.extend((prompt, t) for t in texts)
            return [-float(len(t)) for t in texts]

    cached = CachedScorer(Counting())
    assert cached.logprob_per_token("p1", ["a", "bb", "a"]) == [-1.0, -2.0, -1.0]
    assert cached.logprob_per_token("p1", ["bb", "ccc"]) == [-2.0, -3.0]
    assert cached.logprob_per_token("p2", ["a"]) == [-1.0]  # another prompt is another question
    assert asked == [("p1", "a"), ("p1", "bb"), ("p1", "ccc"), ("p2", "a")]
