"""Pair construction from judged candidate sets: strategies, ties, margins, caps, the length and collapse guards,
degenerate chosen sides, ids."""

from __future__ import annotations

import pytest

from judge.base import Judgement
from judge.pairs import PairPolicy, best_and_worst, build_pairs, candidate_pairs, select
from judge.rule_judge import RuleJudge
from judge.seen import SeenIds
from core.contracts import (
    CandidateSet,
    ChatMessage,
    Completion,
    PromptEvent,
    SamplingParams,
    pair_id,
)
from core.settings import JudgeSettings

TASK = {"kind": "constraints", "constraints": [{"type": "max_words", "n": 5}]}


def cset(texts: list[str], version: int = 2, prompt_id: str = "train-0001") -> CandidateSet:
    prompt = PromptEvent(id=prompt_id, messages=[ChatMessage(role="user", content="Describe the sea.")],
                         task=TASK, source="test")
    comps = [Completion(text=t, token_ids=[10 + i, 20 + i, 2], logprobs=[-0.5, -1.0 - i, -0.1],
                        finish_reason="stop") for i, t in enumerate(texts)]
    return CandidateSet(prompt=prompt, prompt_token_ids=[1, 5, 7], completions=comps, policy_version=version,
                        sampling=SamplingParams(n=len(texts), temperature=1.0, top_p=1.0, max_tokens=48))


def judged(cs: CandidateSet) -> Judgement:
    return RuleJudge().judge(cs.prompt, [c.text for c in cs.completions])


def test_best_and_worst_break_ties_by_first():
    assert best_and_worst([0.5, 1.0, 0.2, 1.0, 0.2]) == (1, 2)


def test_best_vs_worst_pair_carries_the_sampler_data():
    cs = cset(["a b c d e f g", "the sea", "a b c d e f g h i j", "calm sea today"])
    j = judged(cs)
    assert j.scores == [pytest.approx(0.6), 1.0, 0.0, 1.0]
    (pair,), dropped = build_pairs(cs, j, "verifier", PairPolicy())
    assert dropped == []
    assert (pair.chosen, pair.rejected) == ("the sea", "a b c d e f g h i j")
    assert pair.id == pair_id("train-0001", "the sea", "a b c d e f g h i j", 2)
    assert pair.prompt == cs.prompt and pair.policy_version == 2 and pair.judge == "verifier"
    assert pair.prompt_token_ids == [1, 5, 7]
    assert pair.chosen_token_ids == [11, 21, 2] and pair.rejected_token_ids == [12, 22, 2]
    assert pair.chosen_logprobs == [-0.5, -2.0, -0.1] and pair.rejected_logprobs == [-0.5, -3.0, -0.1]
    assert (pair.chosen_score, pair.rejected_score, pair.margin) == (1.0, 0.0, 1.0)
    (again,), _ = build_pairs(cset([c.text for c in cs.completions]), j, "verifier", PairPolicy())
    assert again.id == pair.id  # same judged pair, same id: replays dedupe
    (other,), _ = build_pairs(cset(["the sea", "a b c d e f g h i j"], version=3), Judgement([1.0, 0.0]), "verifier",
                              PairPolicy())
    assert other.id != pair.id


def test_strategies_choose_their_pairs():
    scores = [0.2, 0.9, 0.5, 0.0]
    assert candidate_pairs(scores, "best_vs_worst") == [(1, 3)]
    assert sorted(candidate_pairs(scores, "all_pairs")) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 0), (2, 3)]
    assert sorted(candidate_pairs(scores, "top_k", k=2)) == [(1, 0), (1, 3), (2, 0), (2, 3)]
    assert candidate_pairs(scores, "top_k", k=5) == candidate_pairs(scores, "top_k", k=2)  # k is at most n // 2


def test_ties_margins_identical_and_cap_are_dropped_with_reasons():
    texts = ["w1", "w2", "w3", "w4"]
    assert select(texts, Judgement([1.0, 1.0, 1.0, 1.0]), PairPolicy())[1] == ["tie"]
    assert select(texts, Judgement([0.5, 0.45, 0.5, 0.5]), PairPolicy(min_margin=0.1))[1] == ["margin"]
    kept, dropped = select(["same", "same"], Judgement([1.0, 0.0]), PairPolicy())
    assert kept == [] and dropped == ["identical"]  # a judge may score equal texts apart: still nothing to learn
    kept, dropped = select(texts, Judgement([1.0, 0.7, 0.7, 0.0]), PairPolicy(strategy="all_pairs", max_pairs=3))
    assert [(w, l) for w, l, _ in kept] == [(0, 3), (1, 3), (2, 3)]  # widest margins first
    assert sorted(dropped) == ["cap", "cap", "tie"]  # (1, 2) tie; (0, 1) and (0, 2) over the cap
    with pytest.raises(ValueError, match="scores"):
        select(texts, Judgement([1.0]), PairPolicy())


def test_pairwise_verdicts_veto_pairs_the_judge_did_not_decide():
    texts = ["a", "b", "c"]
    # Round-robin says 0 > 2, but their own comparison was a tie (position-inconsistent): no pair.
    tie = Judgement([0.75, 0.5, 0.25], {(0, 1): 1, (0, 2): 0, (1, 2): 1})
    assert select(texts, tie, PairPolicy())[1] == ["tie"]
    won = Judgement([0.75, 0.5, 0.25], {(0, 1): 0, (0, 2): 1, (1, 2): 0})
    assert select(texts, won, PairPolicy())[0] == [(0, 2, 0.5)]
    assert won.verdict(2, 0) == -1 and Judgement([1.0, 0.0]).verdict(0, 1) is None


def test_length_guard_drops_or_penalises_longer_winners():
    short, long_ = "the sea is calm", "the sea is calm and blue and wide and deep and very old"
    j = Judgement([0.9, 0.6])  # the long answer wins by 0.3
    assert select([long_, short], j, PairPolicy())[0] == [(0, 1, pytest.approx(0.3))]
    assert select([long_, short], j, PairPolicy(length_guard="drop"))[1] == ["length"]
    # Chosen is ~3.6x longer (1.86 doublings): a 0.25 penalty per doubling eats the 0.3 margin, 0.1 does not.
    assert select([long_, short], j, PairPolicy(length_guard="penalize", length_penalty=0.25))[1] == ["length"]
    assert len(select([long_, short], j, PairPolicy(length_guard="penalize", length_penalty=0.1))[0]) == 1
    # A shorter (or about as long) winner is never touched.
    assert len(select([short, long_], j, PairPolicy(length_guard="drop"))[0]) == 1
    assert len(select([short + "!", short], j, PairPolicy(length_guard="drop", length_tolerance=0.1))[0]) == 1


def test_collapse_guard_drops_or_penalises_much_shorter_winners():
    one, ten = "no", "the sea is calm and blue and wide and deep"
    sixteen = "the sea is calm and blue and wide and deep and old and full of fish"
    assert (len(one.split()), len(ten.split()), len(sixteen.split())) == (1, 10, 16)
    j = Judgement([0.9, 0.6])  # the short answer wins by 0.3
    assert select([one, ten], j, PairPolicy())[0] == [(0, 1, pytest.approx(0.3))]  # off by default
    assert select([one, ten], j, PairPolicy(collapse_guard="drop")) == ([], ["collapse"])
    # `drop` draws the line at collapse_ratio x the rejected's words: 5 of 10 stays, 4 of 10 goes.
    five, four = "the sea is very calm", "the sea is calm"
    assert len(select([five, ten], j, PairPolicy(collapse_guard="drop", collapse_ratio=0.5))[0]) == 1
    assert select([four, ten], j, PairPolicy(collapse_guard="drop", collapse_ratio=0.5))[1] == ["collapse"]
    assert len(select([four, ten], j, PairPolicy(collapse_guard="drop", collapse_ratio=0.4))[0]) == 1
    # `penalize`: 1 word against 16 is 4 halvings. 0.1 per halving (0.4) eats the 0.3 margin; 0.05 (0.2) does
    # not, and the published margin stays the judge's 0.3.
    assert select([one, sixteen], j, PairPolicy(collapse_guard="penalize", collapse_penalty=0.1))[1] == ["collapse"]
    kept, dropped = select([one, sixteen], j, PairPolicy(collapse_guard="penalize", collapse_penalty=0.05))
    assert kept == [(0, 1, pytest.approx(0.3))] and dropped == []
    # ... unless what is left (0.1) is under min_margin.
    strict = PairPolicy(collapse_guard="penalize", collapse_penalty=0.05, min_margin=0.15)
    assert select([one, sixteen], j, strict)[1] == ["collapse"]
    # 4 words against 10 (1.32 halvings) at 0.25 per halving: 0.33 > 0.3 dropped; at 0.2: 0.26, kept.
    assert select([four, ten], j, PairPolicy(collapse_guard="penalize", collapse_penalty=0.25))[1] == ["collapse"]
    assert len(select([four, ten], j, PairPolicy(collapse_guard="penalize", collapse_penalty=0.2))[0]) == 1
    # A longer (or not much shorter) winner is never touched.
    assert len(select([ten, one], j, PairPolicy(collapse_guard="drop"))[0]) == 1
    assert len(select([five, ten], j, PairPolicy(collapse_guard="penalize", collapse_penalty=10.0))[0]) == 1


def test_collapse_settings_reach_the_pair_policy():
    policy = PairPolicy.from_settings(JudgeSettings(collapse_guard="drop", collapse_ratio=0.3, collapse_penalty=0.2))
    assert (policy.collapse_guard, policy.collapse_ratio, policy.collapse_penalty) == ("drop", 0.3, 0.2)
    assert PairPolicy.from_settings(JudgeSettings()).collapse_guard == "penalize"  # on in the service by default


def test_a_degenerate_chosen_is_dropped_whatever_its_score():
    texts = ["beach beach beach beach beach beach", "the beach is calm and the sand is warm", "sand"]
    # A plugin scored the repeated word highest; the guard marked it (and "sand") as degenerate.
    j = Judgement([1.0, 0.5, 0.0], failures=["repetitive", None, "too_short"])
    assert j.degenerate(0) == "repetitive" and j.degenerate(1) is None and Judgement([1.0]).degenerate(0) is None
    assert select(texts, j, PairPolicy()) == ([], ["degenerate"])  # best_vs_worst: repetitive over too short
    kept, dropped = select(texts, j, PairPolicy(strategy="all_pairs"))
    assert kept == [(1, 2, 0.5)] and sorted(dropped) == ["degenerate", "degenerate"]


def test_seen_ids_are_bounded_and_refreshed():
    seen = SeenIds(capacity=2)
    assert seen.add("a") and seen.add("b") and not seen.add("a")  # "a" refreshed: "b" is now the oldest
    assert seen.add("c") and "b" not in seen and "a" in seen and len(seen) == 2
    seen.forget("a")
    assert seen.add("a")
