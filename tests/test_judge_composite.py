"""The composite judge (a plugin's score x the quality guard) and the pairs it makes.

The required property: a degenerate candidate (empty, one word, a repeated
word, an off-topic sentence, word salad) is never the chosen side of a
published pair, whatever the plugin scored it, under every pairing strategy;
and the plugin alone (`rules_only`, what the loop ran before) does make such
pairs on the same candidate sets, so the property is the guard's doing.
"""

from __future__ import annotations

import random

import pytest

from judge.registry import make_judge, make_plugin
from judge.composite import FAILED_SCORE, CompositeJudge
from judge.pairs import PairPolicy, build_pairs
from judge.quality import GuardLimits, QualityGuard
from judge.rule_judge import RuleJudge
from judge.verifier import on_topic, score, score_constraints, strict_pass, topic_words, words
from core.contracts import CandidateSet, ChatMessage, Completion, PromptEvent, SamplingParams
from core.settings import JudgeSettings
from service.task import TOPIC_WORDS, make_prompt, make_prompts

STRATEGIES = [PairPolicy(strategy="best_vs_worst"), PairPolicy(strategy="all_pairs", max_pairs=100),
              PairPolicy(strategy="top_k", k=2, max_pairs=100), PairPolicy(strategy="top_k", k=4, max_pairs=100)]

# --- answers built for a bundled prompt's constraints -------------------------------------------------------

INCLUDE = {"important": "it is important to me", "people": "many people love it", "simple": "it is a simple joy",
           "beautiful": "it is beautiful", "always": "i always smile", "every": "i enjoy every minute",
           "world": "it is my whole world", "time": "i love that time", "life": "it brightens my life",
           "day": "it makes my day"}
FILLERS = ["it brings me a lot of joy", "i think about it often", "it is a happy part of my week",
           "i could talk about it for hours", "it makes me feel calm and glad"]
SHORT_FILLERS = ["it brings joy", "i smile often", "it feels calm"]


def constraints(p: PromptEvent) -> dict[str, dict]:
    return {c["type"]: c for c in p.task.get("constraints", [])}


def subject(p: PromptEvent) -> str:
    return p.task["topic"].replace("your ", "my ")


def answer(p: PromptEvent, about: str) -> str:
    """An answer about `about` that meets every constraint of `p` (but on_topic when `about` is off topic)."""
    cs = constraints(p)
    include = [INCLUDE[cs["include_word"]["word"]]] if "include_word" in cs else []
    top = cs.get("max_words", {}).get("n", 40)
    if "bullet_points" in cs:
        n = cs["bullet_points"]["n"]
        lines = ([f"i love {about}"] + include + FILLERS)[:n]
        if sum(len(words(x)) for x in lines) > top:  # the shortest bullets that still have content
            lines = ([f"i love {about}"] + include + SHORT_FILLERS)[:n]
        return "\n".join(f"- {x}" for x in lines)
    ending = cs["end_with"]["phrase"] if "end_with" in cs else ""
    floor, room = cs.get("min_words", {}).get("n", 0), top - len(words(ending))
    parts = [f"i really love {about}"] + include
    for filler in FILLERS:
        if sum(len(words(x)) for x in parts) >= max(floor, 8) or \
                sum(len(words(x)) for x in parts + [filler]) > room:
            break
        parts.append(filler)
    return " ".join(filter(None, [". ".join(parts) + ".", ending]))


def shouty(p: PromptEvent) -> str:
    """On topic, capitals and commas, no bullets, no include word, no ending."""
    return f"I really love {subject(p)}, and it brings me a lot of joy, and I think about it often."


def rambling(p: PromptEvent) -> str:
    """On topic and fluent, but about twice the word limit (and plain prose, capitalized)."""
    top = constraints(p).get("max_words", {}).get("n", 15)
    text = f"I really love {subject(p)}."
    while len(words(text)) < 2 * top:
        text += " " + ". ".join(f.capitalize() for f in FILLERS) + "."
    return text


def salad(p: PromptEvent, text: str, seed: int) -> str:
    """The same words in a shuffled order, within each bullet and before the ending: every rule still holds."""
    rng = random.Random(seed)
    ending = constraints(p).get("end_with", {}).get("phrase", "")
    if ending:
        return shuffle_words(rng, words(text[:-len(ending)])) + " " + ending
    if text.startswith("- "):
        return "\n".join("- " + shuffle_words(rng, words(line)) for line in text.splitlines())
    return shuffle_words(rng, words(text))


def shuffle_words(rng: random.Random, ws: list[str]) -> str:
    ws = list(ws)
    rng.shuffle(ws)
    return " ".join(ws)


def degenerate(p: PromptEvent) -> list[str]:
    """Answers no one wants that the rules alone score well: the field's one-word hacks, nothing, a repeated
    word, and a fluent sentence about something else that meets every other constraint."""
    cs = constraints(p)
    one_word = cs["include_word"]["word"] + "." if "include_word" in cs else "no"
    topic_word = topic_words(p.task)[0]
    return ["", "no", one_word, " ".join([topic_word] * 6), answer(p, "my old car")]


def plausible(p: PromptEvent, i: int) -> list[str]:
    """On-topic answers of varying rule compliance; every other set lacks the compliant one."""
    return ([answer(p, subject(p))] if i % 2 == 0 else []) + [shouty(p), rambling(p)]


def cset(p: PromptEvent, texts: list[str]) -> CandidateSet:
    texts = list(dict.fromkeys(texts))  # the same text twice is one candidate
    comps = [Completion(text=t, token_ids=[10 + i, 2], logprobs=[-1.0, -0.1], finish_reason="stop")
             for i, t in enumerate(texts)]
    return CandidateSet(prompt=p, prompt_token_ids=[1, 5, 7], completions=comps, policy_version=1,
                        sampling=SamplingParams(n=len(comps), temperature=1.0, top_p=1.0, max_tokens=64))


BUNDLED = make_prompts("train", 150) + make_prompts("heldout", 50)


def test_the_answers_are_what_they_claim_to_be():
    """The candidate builder itself: compliant answers pass every rule, the off-topic one every rule but the
    topic, the plausible ones are on topic and not all compliant, and every topic is named by its own phrase."""
    for topic, ws in TOPIC_WORDS.items():
        assert on_topic(topic.replace("your ", "my "), list(ws)), topic
    for p in BUNDLED:
        compliant, off = answer(p, subject(p)), answer(p, "my old car")
        assert strict_pass(p.task, compliant), (p.id, compliant, score_constraints(p.task, compliant))
        assert strict_pass(p.task, salad(p, compliant, 0)), (p.id, compliant)
        detail = score_constraints(p.task, off)
        assert [k for k, v in detail.items() if v < 1] == [k for k in detail if k.startswith("on_topic")], (p.id, off)
        assert on_topic(shouty(p), topic_words(p.task)) and on_topic(rambling(p), topic_words(p.task))
        assert min(score(p.task, shouty(p)), score(p.task, rambling(p))) < 1, p.id  # at least one falls short


def test_scores_compose_as_the_composition_says():
    p = make_prompt("heldout", 21)  # the zoo: lowercase, no commas, on topic
    texts = ["the zoo is a happy place where families meet friendly animals",  # every rule: 1
             "The zoo is a happy place where families meet friendly animals",  # 10 of 11 words lowercase
             "The Zoo, Where Families Meet Animals, Is Happy.",  # no word lowercase, 2 commas
             "no", ""]
    rules = RuleJudge().judge(p, texts).scores
    assert rules == pytest.approx([1.0, (10 / 11 + 1 + 1) / 3, (0 + 0.5 + 1) / 3, 2 / 3, 0.0])
    product = CompositeJudge(RuleJudge(), QualityGuard()).judge(p, texts)  # no reference: quality 1 when passing
    assert product.scores == pytest.approx(rules[:3] + [FAILED_SCORE, FAILED_SCORE])
    assert product.failures == [None, None, None, "too_short", "empty"]
    assert product.degenerate(3) == "too_short" and product.degenerate(0) is None
    weighted = CompositeJudge(RuleJudge(), QualityGuard(), "weighted", 0.4).judge(p, texts)
    assert weighted.scores == pytest.approx([0.6 * s + 0.4 for s in rules[:3]] + [FAILED_SCORE] * 2)
    with pytest.raises(ValueError, match="composition"):
        CompositeJudge(RuleJudge(), QualityGuard(), "rules_only")


@pytest.mark.parametrize("prompt_id,hack,rules_alone", [
    ("heldout-0021", "no", 2 / 3), ("heldout-0003", "world.", 3.2 / 5), ("heldout-0002", "beautiful.", 2 / 3),
    ("heldout-0021", "zoo.", 1.0),  # the zoo prompt states no word range: one on-topic word meets every rule
])
def test_the_field_hacks_score_below_every_answer(prompt_id, hack, rules_alone):
    p = make_prompt("heldout", int(prompt_id.split("-")[1]))
    real = answer(p, subject(p))
    assert score(p.task, hack) == pytest.approx(rules_alone)
    judged = CompositeJudge(RuleJudge(), QualityGuard()).judge(p, [hack, real, shouty(p)])
    assert judged.failures == ["too_short", None, None]
    assert judged.scores[0] == FAILED_SCORE < 0 < judged.scores[2] < judged.scores[1] == 1.0


def _rules_by_number(text: str) -> float:
    """A task-specific score on a negative scale (like a reward model's): minus the distance from 10 words."""
    return -abs(len(words(text)) - 10)


def test_a_failing_answer_ranks_below_passing_ones_on_a_negative_scale():
    """Reward models (and callables) score below zero: a failing answer must still rank below every passing
    one, and a passing answer over a failing one is still a pair."""
    p = PromptEvent(id="neg", messages=[ChatMessage(role="user", content="Describe the sea.")], source="test",
                    task={"kind": "callable", "path": "tests.test_judge_composite:_rules_by_number"})
    texts = ["the sea is wide and deep and the waves roll in slowly under the grey sky all day long",  # 19: -9
             "no"]  # -9 as well: one word is 9 from 10
    plugin = RuleJudge(allowed_modules=["tests.test_judge_composite"])
    assert plugin.judge(p, texts).scores == [-9.0, -9.0]
    judged = CompositeJudge(plugin, QualityGuard()).judge(p, texts)
    assert judged.failures == [None, "too_short"]
    assert judged.scores[0] > judged.scores[1]
    (pair,), dropped = build_pairs(cset(p, texts), judged, "verifier", PairPolicy())
    assert (pair.chosen, pair.rejected, dropped) == (texts[0], "no", [])


@pytest.mark.parametrize("composition", ["product", "weighted"])
def test_the_composite_judge_never_makes_a_degenerate_candidate_the_chosen_side(composition):
    """200 bundled train and held-out prompts, each with 5 degenerate answers and 2 or 3 plausible ones, judged
    and paired under every strategy, with and without the collapse guard."""
    judge = CompositeJudge(RuleJudge(), QualityGuard(), composition)
    plugin = make_judge(JudgeSettings(composition="rules_only"))  # the old behaviour: the verifier alone
    policies = STRATEGIES + [PairPolicy.from_settings(JudgeSettings(pairing=s, pair_k=2, max_pairs_per_prompt=100))
                             for s in ("best_vs_worst", "all_pairs", "top_k")]  # the service's collapse guard on
    published, plugin_only, exploited = 0, {id(pol): 0 for pol in STRATEGIES}, set()
    for i, p in enumerate(BUNDLED):
        bad = set(degenerate(p))
        good = plausible(p, i)
        cs = cset(p, degenerate(p) + good)
        texts = [c.text for c in cs.completions]
        judged = judge.judge(p, texts)
        assert all((judged.degenerate(k) is not None) == (t in bad) for k, t in enumerate(texts)), \
            (p.id, list(zip(texts, judged.failures)))
        for policy in policies:
            pairs, dropped = build_pairs(cs, judged, "verifier", policy)
            assert pairs, (p.id, policy, dropped)  # a plausible answer over a degenerate one, at least
            assert not [q.chosen for q in pairs if q.chosen in bad], (p.id, policy)
            assert any(q.rejected in bad for q in pairs)
            published += len(pairs)
        old = plugin.judge(p, texts)
        for policy in STRATEGIES:
            pairs, _ = build_pairs(cs, old, "verifier", policy)
            plugin_only[id(policy)] += any(q.chosen in bad for q in pairs)
            exploited.update(kind for kind, t in enumerate(degenerate(p)) for q in pairs if q.chosen == t)
    assert published >= len(BUNDLED) * len(policies)
    # The same sets under the rules alone: a degenerate answer is chosen for many prompts, by every strategy,
    # and each kind of them (but the empty answer, which the verifier scores 0) somewhere.
    for policy in STRATEGIES:
        assert plugin_only[id(policy)] >= len(BUNDLED) // 4, (policy, plugin_only[id(policy)])
    assert exploited == {1, 2, 3, 4}  # "no", the one word, the repeated word, the off-topic sentence


def test_make_judge_composes_the_plugin_with_the_guard():
    assert isinstance(make_judge(JudgeSettings(composition="rules_only")), RuleJudge)
    judge = make_judge(JudgeSettings(reference_logprob=False, guard_min_words=3, guard_off_topic=False,
                                     composition="weighted", quality_weight=0.5))
    assert isinstance(judge, CompositeJudge) and isinstance(judge.plugin, RuleJudge) and judge.name == "verifier"
    assert (judge.composition, judge.weight, judge.guard.reference) == ("weighted", 0.5, None)
    assert (judge.guard.limits.min_words, judge.guard.limits.off_topic) == (3, False)
    assert isinstance(make_plugin(JudgeSettings()), RuleJudge)
    with pytest.raises(ValueError, match="base model"):
        make_judge(JudgeSettings())  # the fluency term on, no model folder given


# --- with the real reference model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(model_dir):
    from judge.fluency import ReferenceScorer

    return ReferenceScorer(model_dir, threads=2)


REAL_PROMPTS = ["train-0001", "train-0003", "train-0000", "heldout-0002", "heldout-0003", "heldout-0021",
                "heldout-0038", "heldout-0362"]


@pytest.mark.integration
def test_with_the_reference_model_word_salad_fails_as_disfluent_and_is_never_chosen(reference):
    """A handful of bundled prompts, the base model scoring fluency. Word salad (the compliant answer's words
    shuffled) meets every rule, so the rules alone choose it; the guard fails it as disfluent."""
    judge = CompositeJudge(RuleJudge(), QualityGuard(GuardLimits(), reference))
    plugin = RuleJudge()
    salad_chosen_by_rules = 0
    for k, pid in enumerate(REAL_PROMPTS):
        split, index = pid.split("-")
        p = make_prompt(split, int(index))
        compliant = answer(p, subject(p))
        word_salad = salad(p, compliant, seed=k)
        bad = {*degenerate(p), word_salad}
        cs = cset(p, [word_salad, *degenerate(p), compliant, shouty(p), rambling(p)])
        texts = [c.text for c in cs.completions]
        judged = judge.judge(p, texts)
        failures = dict(zip(texts, judged.failures))
        assert failures[word_salad] == "disfluent", (pid, word_salad)
        assert all(failures[t] is None for t in (compliant, shouty(p), rambling(p))), (pid, failures)
        assert all(failures[t] is not None for t in bad), (pid, failures)
        # The best answer meets every rule (the compliant one, or one as compliant and more fluent); the
        # fluency term scales each score by at most the weight.
        best = texts[judged.scores.index(max(judged.scores))]
        assert strict_pass(p.task, best) and failures[best] is None, (pid, best)
        rules = dict(zip(texts, plugin.judge(p, texts).scores))
        for t, s in zip(texts, judged.scores):
            if failures[t] is None:
                assert 0.75 * rules[t] <= s <= rules[t], (pid, t)
        for policy in STRATEGIES:
            pairs, _ = build_pairs(cs, judged, "verifier", policy)
            assert pairs and not [q.chosen for q in pairs if q.chosen in bad], (pid, policy)
        old = plugin.judge(p, texts)
        assert old.scores[0] == 1.0  # the salad meets every rule: the rules alone choose it over the rest
        pairs, _ = build_pairs(cs, old, "verifier", PairPolicy(strategy="all_pairs", max_pairs=100))
        salad_chosen_by_rules += any(q.chosen == word_salad for q in pairs)
    assert salad_chosen_by_rules == len(REAL_PROMPTS)


@pytest.mark.integration
def test_on_a_negative_scale_the_more_fluent_answer_still_scores_higher(reference):
    """A plugin scoring below zero, two passing answers it scores alike: the fluent one wins, word salad loses."""
    p = PromptEvent(id="neg", messages=[ChatMessage(role="user", content="Describe the sea.")], source="test",
                    task={"kind": "callable", "path": "tests.test_judge_composite:_rules_by_number"})
    fluent = "the sea is wide and deep and the waves roll in slowly under the grey sky"
    shuffled = salad(p, fluent, seed=1)
    plugin = RuleJudge(allowed_modules=["tests.test_judge_composite"])
    assert plugin.judge(p, [fluent, shuffled]).scores == [-6.0, -6.0]  # 16 words, 6 from 10
    guard = QualityGuard(GuardLimits(min_ref_logprob=-12.0), reference)  # the salad passes, with a low quality
    lp_fluent, lp_salad = (a.ref_logprob for a in guard.assess(p, [fluent, shuffled]))
    assert lp_fluent > -4.0 > lp_salad > -12.0
    for composition in ("product", "weighted"):
        judged = CompositeJudge(plugin, guard, composition).judge(p, [fluent, shuffled])
        assert judged.failures == [None, None]
        assert judged.scores[0] > judged.scores[1], composition
